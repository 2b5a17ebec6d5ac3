"""The emulator's knobs, defined once: the ``Faults`` and ``Behaviour`` the emulator
reads (``emulator.EmulatorOptions`` is a ``Behaviour`` with its faults), the
``tasknotes emulator`` options (``add_knob_options``, ``knobs_from_args``) and the
``sandbox.emulator`` config section (``config.EmulatorSettings``) all come from here.

Each field of ``Faults`` and ``Behaviour`` is one knob: its type carries its bounds
(pydantic ``Field`` constraints, checked when the config is read and when a flag is
parsed) and its metadata (``knob``) its command-line flag, help text and whether the
config accepts it. Fractions are of requests (0-1), times in seconds unless the name
says ``_ms``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Final, Literal, TypeVar

from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError

Fraction = Annotated[float, Field(ge=0, le=1)]
Seconds = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=0)]
EventsShape = Literal["event_id", "envelope"]
EVENTS_SHAPES: Final[tuple[EventsShape, ...]] = typing.get_args(EventsShape)


def _ordered(value: tuple[float, float]) -> tuple[float, float]:
    if not 0 <= value[0] <= value[1]:
        raise ValueError("A or [A, B] with 0 <= A <= B")
    return value


# A uniform range [A, B] in milliseconds (a config list [A, B], a flag "A[,B]").
Millis = Annotated[tuple[float, float], AfterValidator(_ordered)]


def knob(help: str, *, flag: str | None = None, metavar: str | None = None,
         config: bool = True, aliases: tuple[str, ...] = (), repeat: bool = False,
         parse: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """A ``Faults`` or ``Behaviour`` field's metadata: where the knob can be set.

    ``help``: the option's help (a fault's: what happens to the requests it hits);
    ``flag``: its ``tasknotes emulator`` option (None: not on the command line);
    ``metavar``: the option's placeholder (default: from the flag);
    ``config``: a key of ``sandbox.emulator.faults`` (a fault) or ``sandbox.emulator``;
    ``aliases``: more flags for the same knob; ``repeat``: the flag is repeatable, each
    giving one member of the knob's set or tuple; ``parse``: how one flag value reads
    (default: checked against the field's type).
    """
    return {"flag": flag, "help": help, "metavar": metavar, "config": config,
            "aliases": aliases, "repeat": repeat, "parse": parse}


@dataclass(frozen=True, slots=True)
class Faults:
    """Fractions of requests (0-1) that meet each fault, and the fault's parameters."""

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(extra="forbid")

    rate_429: Fraction = field(default=0.0, metadata=knob(
        "429 Too Many Requests, with Retry-After", flag="--fault-429"))
    rate_503: Fraction = field(default=0.0, metadata=knob(
        "503 Service Unavailable, with Retry-After", flag="--fault-503",
        aliases=("--error-rate",)))
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
    # Not a request fault: the EMR's answer, drawn per note (the only_* limits do not apply).
    fail_rate: Fraction = field(default=0.0, metadata=knob(
        "notes that fail in the EMR (task_note.failed)", flag="--fail-rate"))


def _range(text: str) -> tuple[float, float]:
    """A flag's "A" or "A,B" (milliseconds) as a checked ``Millis``."""
    parts = text.split(",")
    if len(parts) not in (1, 2):
        raise ValueError("A or A,B")
    value: tuple[float, float] = _millis().validate_python((parts[0], parts[-1]))
    return value


def _token_pair(text: str) -> tuple[str, str]:
    token, sep, reference = text.partition("=")
    if not (sep and token and reference):
        raise ValueError("TOKEN=REF: an access token and its reference id")
    return token, reference


@functools.cache
def _millis() -> TypeAdapter[tuple[float, float]]:
    """The checker of a flag's range, built on first use (not at every start-up)."""
    return TypeAdapter(Millis)


@dataclass(frozen=True, slots=True)
class Behaviour:
    """The emulator's knobs that are not faults: its timings, limits, accounts and answers.

    Times in milliseconds; the emulator's defaults, which ``tasknotes emulator`` and a
    sandbox run (``sandbox.emulator``) share."""

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(extra="forbid")

    latency_ms: Millis = field(default=(0.0, 0.0), metadata=knob(
        "delay before answering each request, uniform in [A, B] ms",
        flag="--latency-ms", metavar="A[,B]", parse=_range))
    outcome_delay_ms: Millis = field(default=(200.0, 1500.0), metadata=knob(
        "time from a stored note to its outcome webhook, uniform in [A, B] ms",
        flag="--outcome-delay-ms", metavar="A[,B]", parse=_range))
    rate_limit: Annotated[float, Field(gt=0)] | None = field(default=None, metadata=knob(
        "answer 429 above this many requests per second (default: no limit)",
        flag="--rate-limit", metavar="RPS"))
    seed: int = field(default=0, metadata=knob(
        "seed of the timings and of which requests meet a fault", flag="--seed",
        metavar="N"))
    events_shape: EventsShape = field(default="event_id", metadata=knob(
        "which documented shape GET /v1/webhook-events answers in: event_id items (filter "
        "delivery_status) or envelope items (filter status)", flag="--events-shape"))
    missing_tasks: frozenset[str] = field(default=frozenset(), metadata=knob(
        "a task id the EMR does not have (task_note.failed); repeatable (default: none)",
        flag="--missing-task", metavar="ID", repeat=True))
    client_id: str = field(default="sandbox-client-id", metadata=knob(
        "accepted client_id", flag="--client-id", config=False))
    client_secret: str = field(default="sandbox-client-secret", metadata=knob(
        "accepted client_secret", flag="--client-secret", config=False))
    access_token: str = field(default="sandbox-access-token", metadata=knob(
        "accepted access_token", flag="--access-token", config=False))
    webhook_url: str | None = field(default=None, metadata=knob(
        "where to deliver task_note.* webhooks (default: none; outcomes can only be "
        "polled)", flag="--webhook-url", config=False))
    webhook_secret: str = field(default="sandbox-webhook-secret", metadata=knob(
        "key of the webhooks' HMAC-SHA256 signature", flag="--webhook-secret",
        config=False))
    # More clinics (api.accounts): in a sandbox run these come from the api section.
    account_reference: str = field(default="user_sandbox", metadata=knob(
        "the access_token_reference_id of --access-token's connection",
        flag="--reference-id", config=False))
    tokens: tuple[tuple[str, str], ...] = field(default=(), metadata=knob(
        "one more accepted access token and its connection's access_token_reference_id "
        "(several clinics); repeatable (default: none)", flag="--token",
        metavar="TOKEN=REF", repeat=True, parse=_token_pair, config=False))
    revoked: frozenset[str] = field(default=frozenset(), metadata=knob(
        "an access token answered 401 (a revoked connection); repeatable (default: none)",
        flag="--revoked-token", metavar="TOKEN", repeat=True, config=False))


def behaviour_keys() -> frozenset[str]:
    """The ``Behaviour`` knobs ``sandbox.emulator`` accepts (its other keys: ``faults``,
    ``revoked_accounts``, and ``fail_rate`` for ``faults.fail_rate``)."""
    return frozenset(f.name for f in dataclasses.fields(Behaviour) if f.metadata["config"])

def config_keys() -> frozenset[str]:
    """The knobs ``sandbox.emulator.faults`` accepts."""
    return frozenset(f.name for f in dataclasses.fields(Faults) if f.metadata["config"])


def add_knob_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``tasknotes emulator``: one per knob with a flag, checked as the
    config is; the faults in their own group."""
    _add_options(parser, Behaviour)
    _add_options(parser.add_argument_group("faults (fractions of requests)"), Faults)


KnobsT = TypeVar("KnobsT", Behaviour, Faults)


def _add_options(group: argparse._ActionsContainer, knobs: type[Any]) -> None:
    hints = typing.get_type_hints(knobs, include_extras=True)
    for f in dataclasses.fields(knobs):
        meta = f.metadata
        if meta["flag"] is None:
            continue
        flags = (meta["flag"],)
        hint = hints[f.name]
        if hint is bool:
            group.add_argument(*flags, dest=f.name, action="store_true", help=meta["help"])
            continue
        metavar = meta["metavar"] or meta["flag"].lstrip("-").replace("-", "_").upper()
        member = typing.get_args(hint)[0] if meta["repeat"] else hint
        parse = _checked(meta["parse"]) if meta["parse"] else _parser(member)
        if typing.get_origin(hint) is Literal:
            group.add_argument(*flags, dest=f.name, choices=typing.get_args(hint),
                               default=f.default, help=meta["help"])
        elif meta["repeat"]:
            group.add_argument(*flags, dest=f.name, action="append", type=parse, default=[],
                               metavar=metavar, help=meta["help"])
        else:
            group.add_argument(*flags, dest=f.name, type=parse, default=f.default,
                               metavar=metavar, help=meta["help"])
        for alias in meta["aliases"]:  # its own option: errors name the flag given
            group.add_argument(alias, dest=f.name, type=parse, metavar=metavar,
                               default=argparse.SUPPRESS,
                               help=f"the same as {flags[0]} (default: as that flag)")


def knobs_from_args(knobs: type[KnobsT], args: argparse.Namespace) -> KnobsT:
    """The ``Faults`` or ``Behaviour`` the parsed options of ``add_knob_options`` describe."""
    hints = typing.get_type_hints(knobs)
    values = {}
    for f in dataclasses.fields(knobs):
        if f.metadata["flag"] is None:
            continue
        value = getattr(args, f.name)
        values[f.name] = (typing.get_origin(hints[f.name])(value) if f.metadata["repeat"]
                          else value)
    return knobs(**values)


def knob_values(knobs: Behaviour | Faults, *, config_only: bool = False) -> dict[str, Any]:
    """``knobs`` as keyword arguments (``{field: value}``), e.g. to build an
    ``EmulatorOptions``; ``config_only``: only the knobs the config can set."""
    return {f.name: getattr(knobs, f.name) for f in dataclasses.fields(knobs)
            if f.metadata["config"] or not config_only}


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` with its ValueError (or pydantic's) as argparse's one-line error."""
    def checked(text: str) -> Any:
        try:
            return parse(text)
        except ValidationError as exc:
            problem = exc.errors(include_input=False, include_url=False)[0]
            raise argparse.ArgumentTypeError(f"{problem['msg']}, not {text!r}") from None
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc}, not {text!r}") from None

    return checked


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
