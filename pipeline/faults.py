"""The emulator's fault knobs, defined once: the ``Faults`` the emulator reads, the
``tasknotes emulator`` options (``add_fault_options``, ``faults_from_args``) and the
``sandbox.emulator.faults`` config section (``config.EmulatorSettings``) all come from here.

Each field of ``Faults`` is one knob: its type carries its bounds (pydantic
``Field`` constraints, checked when the config is read and when a flag is
parsed) and its metadata (``knob``) its command-line flag, help text and
whether the config accepts it. Fractions are of requests (0-1), times in
seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

Fraction = Annotated[float, Field(ge=0, le=1)]
Seconds = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=0)]


def knob(help: str, *, flag: str | None = None, metavar: str | None = None,
         config: bool = True) -> dict[str, Any]:
    """A ``Faults`` field's metadata: where the knob can be set.

    ``help``: the option's help (a fault's: what happens to the requests it hits);
    ``flag``: its ``tasknotes emulator`` option (None: not on the command line);
    ``metavar``: the option's placeholder (default: from the flag);
    ``config``: a key of ``sandbox.emulator.faults``.
    """
    return {"flag": flag, "help": help, "metavar": metavar, "config": config}


@dataclass(frozen=True, slots=True)
class Faults:
    """Fractions of requests (0-1) that meet each fault, and the fault's parameters."""

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(extra="forbid")

    rate_429: Fraction = field(default=0.0, metadata=knob(
        "429 Too Many Requests, with Retry-After", flag="--fault-429"))
    rate_503: Fraction = field(default=0.0, metadata=knob(
        "503 Service Unavailable, with Retry-After", flag="--fault-503"))
    rate_400: Fraction = field(default=0.0, metadata=knob(
        "400: refused as a bad request (final)", flag="--fault-400"))
    drop_before_store: Fraction = field(default=0.0, metadata=knob(
        "drop the connection after reading the request", flag="--fault-drop"))
    rate_500_after_store: Fraction = field(default=0.0, metadata=knob(
        "store the note, then answer 500", flag="--fault-500-after-store"))
    slow_after_store: Fraction = field(default=0.0, metadata=knob(
        "store the note, then answer after --slow-s", flag="--fault-slow-after-store"))
    drop_after_store: Fraction = field(default=0.0, metadata=knob(
        "store the note, then drop the connection", flag="--fault-drop-after-store"))
    garbage_after_store: Fraction = field(default=0.0, metadata=knob(
        "store the note, then answer 200 with a body that is not JSON",
        flag="--fault-garbage-after-store"))
    reset_after_store: Fraction = field(default=0.0, metadata=knob(
        "store the note, then reset the connection (TCP RST)",
        flag="--fault-reset-after-store"))
    only_first: Count = field(default=0, metadata=knob(
        "faults hit only the first N attempts of each note (0: all)",
        flag="--faults-only-first", metavar="N", config=False))
    only_tasks: frozenset[str] = field(default=frozenset(), metadata=knob(
        "not empty: faults hit only these task ids", config=False))
    only_references: frozenset[str] = field(default=frozenset(), metadata=knob(
        "not empty: faults hit only the notes of these connections "
        "(access_token_reference_id), e.g. a 429 storm on one clinic",
        flag="--faults-only-reference", metavar="REF[,REF...]"))
    retry_after_s: Seconds = field(default=1.0, metadata=knob(
        "Retry-After of a 429/503, in seconds", flag="--retry-after", metavar="S"))
    retry_after_as_date: bool = field(default=False, metadata=knob(
        "send Retry-After as an HTTP date", flag="--retry-after-date"))
    slow_s: Seconds = field(default=30.0, metadata=knob(
        "how long a slow answer takes, in seconds", flag="--slow-s"))
    drop_webhooks: Fraction = field(default=0.0, metadata=knob(
        "record outcomes but never deliver them (for poll)", flag="--drop-webhooks"))
    # GET /v1/webhook-events, counted not drawn (polling is sequential): the first
    # events_429 answer 429, the next events_503 answer 503, both with Retry-After.
    events_429: Count = field(default=0, metadata=knob(
        "the first N event queries answer 429", config=False))
    events_503: Count = field(default=0, metadata=knob(
        "the next N event queries answer 503", config=False))
    events_400: Count = field(default=0, metadata=knob(
        "after those, N event queries answer 400 (no Retry-After)", config=False))

def config_keys() -> frozenset[str]:
    """The knobs ``sandbox.emulator.faults`` accepts."""
    return frozenset(f.name for f in dataclasses.fields(Faults) if f.metadata["config"])


def add_fault_options(group: argparse._ArgumentGroup) -> None:
    """One option of ``tasknotes emulator`` per knob with a flag, checked as the config is."""
    hints = typing.get_type_hints(Faults, include_extras=True)
    for f in dataclasses.fields(Faults):
        flag = f.metadata["flag"]
        if flag is None:
            continue
        if hints[f.name] is bool:
            group.add_argument(flag, dest=f.name, action="store_true", help=f.metadata["help"])
            continue
        metavar = f.metadata["metavar"] or flag.lstrip("-").replace("-", "_").upper()
        group.add_argument(flag, dest=f.name, type=_parser(hints[f.name]), default=f.default,
                           metavar=metavar, help=f.metadata["help"])


def faults_from_args(args: argparse.Namespace) -> Faults:
    """The ``Faults`` the parsed options of ``add_fault_options`` describe."""
    return Faults(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Faults)
                     if f.metadata["flag"] is not None})


def _parser(annotation: Any) -> Any:
    """An argparse ``type=`` that checks a value against ``annotation``'s bounds."""
    adapter: TypeAdapter[Any] = TypeAdapter(annotation)
    if typing.get_origin(annotation) is frozenset:  # a set of names: comma-separated
        return lambda text: frozenset(t.strip() for t in text.split(",") if t.strip())

    def parse(text: str) -> Any:
        try:
            return adapter.validate_strings(text)
        except ValidationError as exc:
            problem = exc.errors(include_input=False, include_url=False)[0]
            raise argparse.ArgumentTypeError(f"{problem['msg']}, not {text!r}") from None

    return parse
