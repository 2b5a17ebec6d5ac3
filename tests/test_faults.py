"""The emulator's fault knobs, defined once (faults.py): the flags and the config keys agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import write_config
from pipeline.cli import _parser
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.faults import Faults, faults_from_args

# The public contract (README, configs/): flag -> knob, and the knobs the config accepts.
FLAGS = {
    "--fault-429": "rate_429", "--fault-503": "rate_503", "--fault-400": "rate_400",
    "--fault-drop": "drop_before_store", "--fault-500-after-store": "rate_500_after_store",
    "--fault-slow-after-store": "slow_after_store",
    "--fault-drop-after-store": "drop_after_store",
    "--fault-garbage-after-store": "garbage_after_store",
    "--fault-reset-after-store": "reset_after_store", "--faults-only-first": "only_first",
    "--retry-after": "retry_after_s", "--retry-after-date": "retry_after_as_date",
    "--slow-s": "slow_s", "--drop-webhooks": "drop_webhooks",
}
CONFIG_KEYS = sorted(set(FLAGS.values()) - {"only_first"})


@pytest.mark.parametrize(("flag", "name"), FLAGS.items())
def test_each_fault_flag_sets_its_knob(flag: str, name: str) -> None:
    value = getattr(Faults(), name)
    argv = [flag] if isinstance(value, bool) else [flag, "1"]
    faults = faults_from_args(_parser().parse_args(["emulator", *argv]))
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
        _parser().parse_args(["emulator", "--fault-503", "1.5"])
    assert "--fault-503: Input should be less than or equal to 1" in capsys.readouterr().err
    path = write_config(tmp_path, sandbox={"emulator": {"faults": {"rate_503": 1.5}}})
    with pytest.raises(ConfigError, match=r"sandbox\.emulator\.faults\.rate_503: must be <= 1"):
        load_config(path)
