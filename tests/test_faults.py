"""The emulator's fault knobs, defined once (faults.py): the flags and the config keys agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import write_config
from pipeline.cli import build_parser
from pipeline.config import load_config
from pipeline.emulator import EmulatorOptions
from pipeline.errors import ConfigError
from pipeline.faults import (
    EVENTS_SHAPES,
    Behaviour,
    Faults,
    knob_values,
    knobs_from_args,
)
from pipeline.sandbox import emulator_options

# The public contract (README, configs/): flag -> knob, and the knobs the config accepts.
FLAGS = {
    "--fault-429": "rate_429", "--fault-503": "rate_503", "--fault-400": "rate_400",
    "--fault-drop": "drop_before_store", "--fault-500-after-store": "rate_500_after_store",
    "--fault-slow-after-store": "slow_after_store",
    "--fault-drop-after-store": "drop_after_store",
    "--fault-garbage-after-store": "garbage_after_store",
    "--fault-reset-after-store": "reset_after_store", "--faults-only-first": "only_first",
    "--retry-after": "retry_after_s", "--retry-after-date": "retry_after_as_date",
    "--slow-s": "slow_s", "--drop-webhooks": "drop_webhooks", "--fail-rate": "fail_rate",
}
CONFIG_KEYS = sorted(set(FLAGS.values()) - {"only_first"})


@pytest.mark.parametrize(("flag", "name"), FLAGS.items())
def test_each_fault_flag_sets_its_knob(flag: str, name: str) -> None:
    value = getattr(Faults(), name)
    argv = [flag] if isinstance(value, bool) else [flag, "1"]
    faults = knobs_from_args(Faults, build_parser().parse_args(["emulator", *argv]))
    expected = True if isinstance(value, bool) else type(value)(1)
    assert faults == Faults(**{name: expected})


def test_the_config_takes_the_same_knobs_as_the_flags(tmp_path: Path) -> None:
    """Every config key lands in the same Faults field the flag sets; nothing else moves."""
    values = {key: True if isinstance(getattr(Faults(), key), bool) else 0.5
              for key in CONFIG_KEYS}
    path = write_config(tmp_path, sandbox={"emulator": {"faults": values}})
    assert load_config(path).sandbox.emulator.faults == Faults(**values)


@pytest.mark.parametrize("key", ["only_first", "only_tasks", "events_429", "bogus"])
def test_knobs_without_a_config_key_are_unknown_keys(tmp_path: Path, key: str) -> None:
    path = write_config(tmp_path, sandbox={"emulator": {"faults": {key: 1}}})
    with pytest.raises(ConfigError, match=rf"sandbox\.emulator\.faults: {key}: unknown key"):
        load_config(path)


def test_a_fraction_above_one_is_refused_by_flag_and_by_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One bound, checked in both places: 0 <= fraction <= 1."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["emulator", "--fault-503", "1.5"])
    assert "--fault-503: Input should be less than or equal to 1" in capsys.readouterr().err
    path = write_config(tmp_path, sandbox={"emulator": {"faults": {"rate_503": 1.5}}})
    with pytest.raises(ConfigError, match=r"sandbox\.emulator\.faults\.rate_503: must be <= 1"):
        load_config(path)


# The emulator's other knobs (Behaviour): flag and config key agree, one default each.
BEHAVIOUR = {"latency_ms": (["--latency-ms", "5,40"], [5, 40], (5.0, 40.0)),
             "outcome_delay_ms": (["--outcome-delay-ms", "7"], [7, 7], (7.0, 7.0)),
             "rate_limit": (["--rate-limit", "2.5"], 2.5, 2.5),
             "seed": (["--seed", "9"], 9, 9),
             "events_shape": (["--events-shape", "envelope"], "envelope", "envelope"),
             "missing_tasks": (["--missing-task", "A", "--missing-task", "B"], ["A", "B"],
                               frozenset({"A", "B"}))}


@pytest.mark.parametrize("name", BEHAVIOUR)
def test_each_emulator_knob_is_the_same_by_flag_and_by_config(tmp_path: Path,
                                                               name: str) -> None:
    """``tasknotes emulator``'s flag and ``sandbox.emulator``'s key reach the emulator as
    the same option; every other option keeps the one default they share."""
    argv, yaml_value, expected = BEHAVIOUR[name]
    by_flag = knobs_from_args(Behaviour, build_parser().parse_args(["emulator", *argv]))
    config = load_config(write_config(tmp_path, webhooks={"secret": "s" * 32}, sandbox={
        "enabled": True, "emulator": {name: yaml_value}}))
    by_config = emulator_options(config, "http://127.0.0.1:1/webhooks/cobalt")
    assert getattr(by_flag, name) == getattr(by_config, name) == expected
    for other in BEHAVIOUR.keys() - {name}:
        assert getattr(by_flag, other) == getattr(by_config, other) == getattr(
            Behaviour(), other)


def test_error_rate_is_the_503_fault_and_fail_rate_a_fault(tmp_path: Path) -> None:
    """``--error-rate`` is another name of ``--fault-503`` (not a second 503 knob);
    ``sandbox.emulator.fail_rate`` (the documented key) is ``faults.fail_rate``."""
    args = build_parser().parse_args(["emulator", "--error-rate", "0.25", "--fail-rate", "0.5"])
    assert knobs_from_args(Faults, args) == Faults(rate_503=0.25, fail_rate=0.5)
    config = load_config(write_config(tmp_path, sandbox={"emulator": {"fail_rate": 0.5}}))
    assert config.sandbox.emulator.faults == Faults(fail_rate=0.5)
    both = write_config(tmp_path, sandbox={"emulator": {"fail_rate": 0.5,
                                                        "faults": {"fail_rate": 0.1}}})
    with pytest.raises(ConfigError, match="not both"):
        load_config(both)


def test_a_bad_range_is_refused_by_flag_and_by_config_naming_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """0 <= A <= B, checked in both places; the config's message names the flat key."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["emulator", "--latency-ms", "40,5"])
    assert "--latency-ms: Value error, A or [A, B] with 0 <= A <= B" in capsys.readouterr().err
    path = write_config(tmp_path, sandbox={"emulator": {"latency_ms": [40, 5]}})
    with pytest.raises(ConfigError, match=r"sandbox\.emulator\.latency_ms: A or \[A, B\]"):
        load_config(path)


@pytest.mark.parametrize("key", ["tokens", "client_id", "behaviour"])
def test_emulator_knobs_without_a_config_key_are_unknown_keys(tmp_path: Path,
                                                              key: str) -> None:
    path = write_config(tmp_path, sandbox={"emulator": {key: "x"}})
    with pytest.raises(ConfigError, match=rf"sandbox\.emulator.*{key}.*"):
        load_config(path)


def test_events_shape_choices_are_the_emulators_shapes(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["emulator", "--events-shape", "neither"])
    assert f"choose from {', '.join(map(repr, EVENTS_SHAPES))}" in capsys.readouterr().err


def test_the_emulator_command_builds_the_options_from_the_knobs() -> None:
    """Multi-account flags reach EmulatorOptions (a Behaviour) unchanged."""
    args = build_parser().parse_args(["emulator", "--token", "t1=north", "--token", "t2=south",
                                 "--revoked-token", "t2", "--reference-id", "west"])
    options = EmulatorOptions(**knob_values(knobs_from_args(Behaviour, args)),
                              faults=knobs_from_args(Faults, args))
    assert (options.tokens, options.revoked, options.account_reference) == (
        (("t1", "north"), ("t2", "south")), frozenset({"t2"}), "west")


def test_the_emulator_knobs_of_a_config_are_in_its_fingerprint(tmp_path: Path) -> None:
    """A config's sandbox.emulator keys count in its fingerprint (a setting changed is a
    new fingerprint); the same config read twice has the same one."""
    def fingerprint(name: str, seed: int) -> str:
        path = write_config(tmp_path, name, sandbox={"emulator": {"seed": seed}})
        return load_config(path).fingerprint()

    assert fingerprint("a.yaml", 1) == fingerprint("b.yaml", 1) != fingerprint("c.yaml", 2)
