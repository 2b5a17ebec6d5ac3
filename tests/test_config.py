"""Config: YAML -> RunConfig; every problem named by its key, secrets never echoed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import config_dict, write_config
from pipeline.config import load_config
from pipeline.errors import ConfigError


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_shipped_configs_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/sandbox.yaml and production.example.yaml are valid as shipped."""
    root = Path(__file__).parent.parent
    sandbox = load_config(root / "configs" / "sandbox.yaml", needs=("api",))
    assert sandbox.sandbox.enabled
    assert sandbox.api.credentials()[0] == "sandbox-client-id"
    faulty = load_config(root / "configs" / "sandbox-faults.yaml", needs=("api",))
    assert faulty.sandbox.emulator.faults.rate_429 > 0
    for var in ("COBALT_CLIENT_ID", "COBALT_CLIENT_SECRET", "COBALT_ACCESS_TOKEN",
                "COBALT_WEBHOOK_SECRET"):
        monkeypatch.setenv(var, f"value-of-{var}")
    production = load_config(root / "configs" / "production.example.yaml",
                             needs=("api", "webhooks"))
    assert production.api.credentials() == ("value-of-COBALT_CLIENT_ID",
                                            "value-of-COBALT_CLIENT_SECRET",
                                            "value-of-COBALT_ACCESS_TOKEN")


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        pytest.param("submit", {"concurrency": 0}, "submit.concurrency: must be >= 1",
                     id="below-minimum"),
        pytest.param("submit", {"concurrency": "many"}, "submit.concurrency: must be a whole",
                     id="not-a-number"),
        pytest.param("submit", {"concurency": 4}, "submit.concurency: unknown key",
                     id="misspelt-key"),
        pytest.param("validation", {"duplicates": "drop"},
                     "validation.duplicates: must be one of 'skip', 'reject' or 'allow'",
                     id="bad-choice"),
        pytest.param("validation", {"emr_task_id_pattern": "([a-z"},
                     "validation.emr_task_id_pattern: not a valid regular expression",
                     id="bad-regex"),
        pytest.param("input", {"encoding": "cp037"}, "input.encoding: 'cp037' is not ASCII",
                     id="ebcdic"),
        pytest.param("input", {"encoding": "klingon"}, "input.encoding: unknown encoding",
                     id="unknown-encoding"),
        pytest.param("input", {"delimiter": ",,"}, "input.delimiter: must be one character",
                     id="long-delimiter"),
        pytest.param("input", {"passthrough": ["line"]},
                     "input.passthrough: line would shadow a results.csv column",
                     id="shadowing-passthrough"),
        pytest.param("api", {"base_url": "ftp://x"}, "api.base_url: must be an http(s) URL",
                     id="bad-url"),
        pytest.param("webhooks", {"path": "hooks"}, "webhooks.path: must start with /",
                     id="relative-path"),
    ],
)
def test_a_bad_value_is_reported_with_its_key(
    tmp_path: Path, section: str, values: dict[str, object], message: str
) -> None:
    """Each wrong key or value stops loading with one line that starts with the YAML key."""
    path = write_config(tmp_path, **{section: values})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_unknown_section_is_an_error(tmp_path: Path) -> None:
    """A top-level key that is not a section is refused, not ignored."""
    data = config_dict(tmp_path)
    data["sumbit"] = {"concurrency": 2}
    with pytest.raises(ConfigError, match=r"sumbit: unknown key"):
        load_config(_write(tmp_path, data))


def test_env_references_are_resolved(tmp_path: Path) -> None:
    """${VAR} takes the variable's value, also inside a longer string."""
    data = config_dict(tmp_path)
    data["api"]["access_token"] = "${TOKEN}"
    data["api"]["base_url"] = "https://${HOST}/"
    config = load_config(_write(tmp_path, data), needs=("api",),
                         env={"TOKEN": "tok-123", "HOST": "api.example.com"})
    assert config.api.credentials()[2] == "tok-123"
    assert config.api.base_url == "https://api.example.com"


def test_a_missing_env_variable_names_key_and_variable(tmp_path: Path) -> None:
    """An unset variable in a needed section stops with the key and the variable's name."""
    data = config_dict(tmp_path)
    data["api"]["client_secret"] = "${COBALT_CLIENT_SECRET}"
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, data), needs=("api",), env={})
    assert str(caught.value) == (
        "api.client_secret: environment variable COBALT_CLIENT_SECRET is not set")


def test_an_unset_variable_outside_the_needed_sections_is_named_where_it_is_wrong(
        tmp_path: Path) -> None:
    """``submit.concurrency: ${CONC}`` with CONC not set: the error names the key and the
    variable, not "must be a whole number" (the value the file holds is one); keys whose
    variables are set, or that are fine with no value, say nothing."""
    data = config_dict(tmp_path)
    data["submit"]["concurrency"] = "${CONC}"
    data["submit"]["max_attempts"] = "${TRIES}"
    data["api"]["access_token"] = "${COBALT_ACCESS_TOKEN}"  # may be empty: no send
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, data), env={"TRIES": "x"})
    message = str(caught.value)
    assert "submit.concurrency: environment variable CONC is not set" in message
    assert "submit.max_attempts: must be a whole number" in message  # set, but wrong
    assert "access_token" not in message
    assert load_config(_write(tmp_path, data), env={"CONC": "3", "TRIES": "2"}
                       ).submit.concurrency == 3


def test_validate_needs_no_secrets(tmp_path: Path) -> None:
    """A command that sends nothing loads a config whose secrets are not in the environment."""
    data = config_dict(tmp_path)
    data["api"]["access_token"] = "${COBALT_ACCESS_TOKEN}"
    config = load_config(_write(tmp_path, data), env={})
    assert config.api.access_token is None
    with pytest.raises(ConfigError, match=r"api.access_token: required"):
        config.api.credentials()


def test_secrets_never_appear_in_errors_or_repr(tmp_path: Path) -> None:
    """A secret's value is not echoed by an error about its key, nor by repr()."""
    data = config_dict(tmp_path)
    data["api"]["client_secret"] = ["s3cr3t-value"]
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, data))
    assert "s3cr3t-value" not in str(caught.value)
    assert "api.client_secret" in str(caught.value)
    data["api"]["client_secret"] = "s3cr3t-value"
    config = load_config(_write(tmp_path, data))
    assert "s3cr3t-value" not in repr(config)
    assert "s3cr3t-value" not in config.fingerprint()


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    """A YAML syntax error says where it is."""
    path = tmp_path / "c.yaml"
    path.write_text("input:\n  path: a.csv\nsubmit: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c.yaml line \d+"):
        load_config(path)


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    """A wrong path is one clear line, not a traceback."""
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_account_defaults_to_a_token_fingerprint(tmp_path: Path) -> None:
    """Without api.account, the ledger key uses a fingerprint of the token, never the token."""
    data = config_dict(tmp_path)
    del data["api"]["account"]
    config = load_config(_write(tmp_path, data))
    account = config.api.account_id()
    assert account.startswith("token:")
    assert "test-access-token" not in account


def test_fingerprint_ignores_secrets_but_not_settings(tmp_path: Path) -> None:
    """Changing a secret keeps the config fingerprint; changing a setting changes it."""
    base = load_config(write_config(tmp_path))
    other_secret = load_config(write_config(tmp_path, "b.yaml", api={"client_secret": "x"}))
    other_setting = load_config(write_config(tmp_path, "c.yaml", submit={"concurrency": 7}))
    assert base.fingerprint() == other_secret.fingerprint()
    assert base.fingerprint() != other_setting.fingerprint()
