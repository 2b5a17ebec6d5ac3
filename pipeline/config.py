"""YAML -> a typed, validated ``RunConfig``.

This is the one module that reads the environment: ``${VAR}`` anywhere in a
string value is replaced by the variable's value. A problem is reported as
``ConfigError`` naming the YAML key (``submit.concurrency: must be >= 1``);
unknown keys are errors. Secrets are ``SecretStr`` and never printed, not even
in error messages (pydantic's echo of the input value is dropped).

Over 400 lines because every config section's model and its validators live here, and
only here (the one module that reads the environment).
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError
from pipeline.faults import Behaviour, Faults, behaviour_keys, config_keys

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Columns results.csv writes itself (report.py): these, then the passthrough columns, then
# "detail" and "outcome_clock" (TRAILING_COLUMNS). A passthrough column may not shadow any.
RESULT_COLUMNS = (
    "source_file", "line", "emr_task_id", "final_status", "submit_status", "http_status",
    "task_note_id", "job_id", "outcome", "emr_note_id", "failure_reason", "event_id",
    "submitted_at", "outcome_at", "error",
)  # fmt: skip
TRAILING_COLUMNS = ("detail", "outcome_clock")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnsConfig(_Section):
    emr_task_id: str = "emr_task_id"
    note: str = "note"
    account: str | None = None  # the CSV column naming each row's account (api.accounts)


class InputConfig(_Section):
    path: str = "sample_data/task_notes.csv"
    encoding: str = "utf-8"
    delimiter: str = ","
    columns: ColumnsConfig = ColumnsConfig()
    passthrough: tuple[str, ...] = ()
    unescape_newlines: bool = False
    on_bad_encoding: Literal["stop", "reject"] = "stop"
    # A single-byte code page is declared but the bytes are valid UTF-8: read as declared anyway.
    force_encoding: bool = False

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            info = codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown encoding {value!r}") from None
        if "\n".encode(info.name) != b"\n" and not info.name.startswith(("utf-16", "utf-32")):
            raise ValueError(f"{value!r} is not ASCII-compatible; re-save the file as UTF-8")
        return value

    @field_validator("delimiter")
    @classmethod
    def _one_character(cls, value: str) -> str:
        value = {"tab": "\t", "\\t": "\t"}.get(value, value)
        if len(value) != 1 or value in '"\r\n':
            raise ValueError("must be one character other than a quote or a line break")
        return value

    @field_validator("passthrough")
    @classmethod
    def _no_shadowing(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        clash = sorted(set(value) & {*RESULT_COLUMNS, *TRAILING_COLUMNS})
        if clash:
            raise ValueError(f"{', '.join(clash)} would shadow a results.csv column")
        if len(set(value)) != len(value):
            raise ValueError("names a column twice")
        return value


class ValidationConfig(_Section):
    emr_task_id_pattern: str = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
    max_note_chars: Annotated[int, Field(ge=1)] = 10_000
    duplicates: Literal["skip", "reject", "allow"] = "skip"

    @field_validator("emr_task_id_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
        return value


class AccountConfig(_Section):
    """One EHR connection (a clinic) of ``api.accounts``: its access token, and limits of
    its own under the global ``submit`` ones. ``reference_id``: the
    ``access_token_reference_id`` Cobalt puts on this connection's webhooks (GET
    /v1/settings names it); set, an event of another connection matched to one of this
    account's rows is a conflict."""

    access_token: SecretStr | None = None
    rate_per_second: Annotated[float, Field(gt=0)] | None = None
    concurrency: Annotated[int, Field(ge=1, le=1024)] | None = None
    reference_id: str | None = None
    # Names this clinic had in the ledger before (an earlier account key, the single
    # form's api.account, or its "token:<fingerprint>"): notes sent under them count as sent.
    formerly: tuple[str, ...] = ()


# An account name as the CSV's account column writes it ("Northside Family Medicine"):
# no control characters, no outer spaces, no spreadsheet formula start (it goes to reports).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_ACCOUNT_NAME = re.compile(r"^[^\x00-\x1f\x7f-\x9f\s=+\-@]([^\x00-\x1f\x7f-\x9f]{0,98}\S)?$")


class ApiConfig(_Section):
    base_url: str = "https://api.usecobalt.com"
    account: str | None = None
    client_id: SecretStr | None = None
    client_secret: SecretStr | None = None
    access_token: SecretStr | None = None
    # The single form's earlier account labels (as api.accounts.<name>.formerly).
    formerly: tuple[str, ...] = ()
    # The single form's connection reference (as api.accounts.<name>.reference_id): the
    # access_token_reference_id Cobalt puts on its webhooks (GET /v1/settings).
    reference_id: str | None = None
    # Several clinics in one run: account name -> its token (instead of account+access_token).
    accounts: dict[str, AccountConfig] | None = None
    timeout_s: Annotated[float, Field(gt=0)] = 30.0
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # aiohttp: httpx's API over aiohttp's connection pool (default; bench/submit.py measures both);
    # httpx: httpx's own pool, fine below ~24 requests in flight.
    transport: Literal["aiohttp", "httpx"] = "aiohttp"

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http(s) URL such as https://api.usecobalt.com")
        return value.rstrip("/")

    @field_validator("accounts")
    @classmethod
    def _named_accounts(cls, value: dict[str, AccountConfig] | None
                        ) -> dict[str, AccountConfig] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("names no account (give at least one, or leave it out)")
        bad = sorted(n for n in value if not _ACCOUNT_NAME.match(n))
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))}: an account name is 1-100 "
                             "characters, no control characters, no outer spaces, not "
                             "starting with = + - @ (it is written to reports)")
        # The ledger key and the run locks take the name in NFC (UAX #15): two names equal
        # after it would share every key, so one clinic's notes would count as the other's.
        seen: dict[str, str] = {}
        for name in value:
            other = seen.setdefault(unicodedata.normalize("NFC", name), name)
            if other != name:
                raise ValueError(f"{other!r} and {name!r}: two account names equal in "
                                 "Unicode NFC (one written with combining characters); "
                                 "give them names that differ visibly")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> ApiConfig:
        both = [k for k in ("account", "access_token", "formerly", "reference_id")
                if getattr(self, k)]
        if self.accounts is not None and both:
            keys = " and ".join(f"api.{k}" for k in both)
            raise ValueError(f"api.accounts: replaces {keys}; give one form, not both")
        self._former_names_unique()
        self._one_connection_each()
        return self

    def _one_connection_each(self) -> None:
        """No two accounts on one Cobalt connection (the same ``access_token`` or the same
        ``reference_id``): its webhooks carry one ``access_token_reference_id``, so an
        event could not say which of the two accounts' notes it settles, and the
        ambiguous rows of one of them would never settle (README: *Outcomes*)."""
        tokens: dict[str, str] = {}
        references: dict[str, str] = {}
        for name, account in (self.accounts or {}).items():
            token = account.access_token.get_secret_value() if account.access_token else ""
            if token and tokens.setdefault(token, name) != name:
                raise ValueError(
                    f"api.accounts.{name}.access_token: the same token as account "
                    f"{tokens[token]!r}: one Cobalt connection, whose webhooks cannot say "
                    "which of the two accounts a note was sent for; send both clinics' rows "
                    f"under one account (the other name in its formerly, if it sent any)")
            ref = account.reference_id
            if ref and references.setdefault(ref, name) != name:
                raise ValueError(
                    f"api.accounts.{name}.reference_id: the same as account "
                    f"{references[ref]!r}'s: each Cobalt connection has its own reference "
                    "id (GET /v1/settings), and an event names one")

    def _former_names_unique(self) -> None:
        """Each former name belongs to one account and is no account's current name."""
        current = set(self.account_names())
        owner: dict[str, str] = {}
        for name, former in self.former_names().items():
            key = "api.formerly" if self.accounts is None else f"api.accounts.{name}.formerly"
            for old in former:
                if not old.strip() or _CONTROL.search(old):
                    raise ValueError(f"{key}: {old!r} is not an account name")
                if old in current:
                    raise ValueError(f"{key}: {old!r} is a configured account's name")
                if old in owner and owner[old] != name:
                    raise ValueError(f"{key}: {old!r} is also a former name of account "
                                     f"{owner[old]!r}")
                owner[old] = name

    def connections(self) -> dict[str, str]:
        """access_token_reference_id -> account name, for the connections whose reference
        id the config gives (``api.accounts.<name>.reference_id``, or the single form's
        ``api.reference_id`` -> ``account_id()``); the others are not known."""
        if self.accounts is None:
            return {self.reference_id: self.account_id()} if self.reference_id else {}
        return {a.reference_id: name for name, a in self.accounts.items() if a.reference_id}

    def known_names(self) -> tuple[str, ...]:
        """Every name this config's notes were sent under: its accounts' (``account_names``)
        and their former names (``formerly``), each once, current names first."""
        former = [old for names in self.former_names().values() for old in names]
        return tuple(dict.fromkeys([*self.account_names(), *former]))

    def former_names(self) -> dict[str, tuple[str, ...]]:
        """Account name -> the names its notes were sent under before (``formerly``): a
        row already sent under any of them is not sent again. Single form: the run's
        label (``account_id()``) -> ``api.formerly``."""
        if self.accounts is None:
            return {self.account_id(): self.formerly}
        return {name: a.formerly for name, a in self.accounts.items()}

    @property
    def multi(self) -> bool:
        """Several accounts (``api.accounts``): each row names its own."""
        return self.accounts is not None

    def account_names(self) -> tuple[str, ...]:
        """The configured account names (``api.accounts``), or ``(account_id(),)``."""
        return tuple(self.accounts) if self.accounts is not None else (self.account_id(),)

    def credentials(self, account: str | None = None) -> tuple[str, str, str]:
        """The three header values, or ConfigError naming the first one missing.

        With ``api.accounts``, ``account`` names whose token (every account's is checked
        when it is None, and the first one's returned)."""
        values = []
        for key in ("client_id", "client_secret"):
            secret = getattr(self, key)
            if secret is None or not secret.get_secret_value():
                raise ConfigError(f"api.{key}: required to send requests, but not set")
            values.append(secret.get_secret_value())
        return values[0], values[1], self._token(account)

    def _token(self, account: str | None) -> str:
        if self.accounts is None:
            if self.access_token is None or not self.access_token.get_secret_value():
                raise ConfigError("api.access_token: required to send requests, but not set")
            return self.access_token.get_secret_value()
        tokens = []
        for name, settings in self.accounts.items():
            token = settings.access_token
            if token is None or not token.get_secret_value():
                raise ConfigError(f"api.accounts.{name}.access_token: required to send "
                                  "requests, but not set")
            if account in (None, name):
                tokens.append(token.get_secret_value())
        if not tokens:
            raise ConfigError(f"api.accounts: no account named {account!r}")
        return tokens[0]

    def account_id(self) -> str:
        """``account`` if set, else a fingerprint of the access token (never the token).

        With ``api.accounts`` each row carries its own account; this is then the run's
        label (the names joined with ``,``), not a ledger key part."""
        if self.accounts is not None:
            return ",".join(self.accounts)
        if self.account:
            return self.account
        token = self.access_token.get_secret_value() if self.access_token else ""
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]


class SubmitConfig(_Section):
    concurrency: Annotated[int, Field(ge=1, le=1024)] = 8
    rate_per_second: Annotated[float, Field(gt=0)] | None = 5.0
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 5
    on_ambiguous: Literal["hold", "resend"] = "hold"
    max_consecutive_failures: Annotated[int, Field(ge=1)] = 20
    backoff_base_s: Annotated[float, Field(ge=0)] = 0.5
    backoff_max_s: Annotated[float, Field(ge=0)] = 30.0
    max_retry_after_s: Annotated[float, Field(ge=0)] = 300.0
    drain_timeout_s: Annotated[float, Field(ge=0)] = 30.0
    # asyncio unless told: no script in bench/ measures uvloop against it yet.
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"

    def backend_options(self) -> dict[str, bool]:
        """anyio.run's backend options for this loop (asyncio when uvloop is missing)."""
        if self.event_loop != "uvloop":
            return {}
        try:
            import uvloop  # noqa: F401, PLC0415 - an optional speed-up, probed on purpose
        except ImportError:
            return {}
        return {"use_uvloop": True}


# The longest retention limit taken (100 years): a cutoff further back than datetime's
# year 1 cannot even be computed, and no record is kept that long.
MAX_RETENTION_DAYS: Final = 36_525


class StateConfig(_Section):
    ledger: Path = Path("state/ledger.sqlite")
    # full: a commit survives power loss (the `sending` mark must); normal: process crash only.
    synchronous: Literal["full", "normal"] = "full"
    # postgresql://user:pass@host:5432/db (from the environment: ${TASKNOTES_STATE_URL}):
    # the ledger and the sink's events live in PostgreSQL (state/store.py), not in the
    # files state.ledger and webhooks.sink.
    url: SecretStr | None = None
    # `tasknotes prune` removes note text kept at rest (sink events, input copies) older
    # than this many days; None: only when told (--older-than).
    retention_days: Annotated[float, Field(gt=0, le=MAX_RETENTION_DAYS)] | None = None
    # Account labels other configs send under through this same state (clinics with a
    # config each on one database): notes sent under them are theirs, not a clinic of
    # this config renamed, so the scan does not warn of them (plan.py).
    other_accounts: tuple[Annotated[str, Field(min_length=1)], ...] = ()

    @field_validator("retention_days", mode="before")
    @classmethod
    def _days_not_a_boolean(cls, value: object) -> object:
        # YAML's true/yes is a bool, and a bool an int to pydantic: `true` was 1 day
        if isinstance(value, bool):
            raise ValueError("a number of days, not true/false")  # noqa: TRY004 - pydantic
        return value

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        # Given, but null or blank (a template that rendered nothing): never a silent
        # fallback to a fresh local ledger, which would send every note again.
        if value is None or not value.get_secret_value().strip():
            raise ValueError("is empty: give the PostgreSQL URL (e.g. "
                             "${TASKNOTES_STATE_URL}), or leave state.url out for the local "
                             "ledger (state.ledger)")
        from pipeline.state.postgres import check_url  # noqa: PLC0415 - no psycopg needed

        check_url(value.get_secret_value())
        if importlib.util.find_spec("psycopg") is None:  # before anything runs, not mid-way
            raise ValueError("needs the PostgreSQL driver psycopg 3, which is not installed: "
                             "pip install -e '.[postgres]' in the tasknotes checkout")
        return value


class WebhooksConfig(_Section):
    sink: Path = Path("state/webhooks.jsonl")
    secret: SecretStr | None = None
    secrets: tuple[SecretStr, ...] = ()
    path: str = "/webhooks/cobalt"
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with /")
        return value

    def all_secrets(self) -> tuple[bytes, ...]:
        """Every secret a signature may be made with (``secret`` first), as bytes."""
        found = [self.secret] if self.secret is not None else []
        found += list(self.secrets)
        return tuple(s.get_secret_value().encode() for s in found if s.get_secret_value())


class PollConfig(_Section):
    # Below this many unresolved jobs, ask per job_id; above, page by date and event type.
    per_job_below: Annotated[int, Field(ge=0)] = 20
    page_size: Annotated[int, Field(ge=1, le=100)] = 100


class ReportConfig(_Section):
    dir: Path = Path("reports")
    stale_after: Annotated[float, Field(gt=0)] = 900.0  # seconds without an outcome
    show_note_preview: bool = False
    preview_chars: Annotated[int, Field(ge=1, le=200)] = 24
    # An EMR failure is worth sending again (redrive.csv) when one of its reason codes,
    # or a phrase of its failure_reason (case-insensitive), is in this list.
    retryable_failures: tuple[str, ...] = (
        "emr_session_expired", "task_locked", "rpa_timeout",
        "session expired", "locked", "timed out", "timeout", "temporarily",
    )
    attention_rows: Annotated[int, Field(ge=1)] = 5000  # table size cap in report.html
    # Prometheus text-format metrics, rewritten atomically after run, reconcile and status
    # (node_exporter's textfile collector reads them; pipeline/metrics.py). None: none.
    metrics_file: Path | None = None


class EmulatorSettings(_Section):
    """How the in-process emulator behaves in a sandbox run (see emulator.py): the knobs of
    faults.py marked for the config, as flat keys (``latency_ms``, ``seed``...) and under
    ``faults``; ``fail_rate`` here is ``faults.fail_rate``."""

    behaviour: Behaviour = Behaviour()  # given as the flat keys: behaviour_keys()
    faults: Faults = Faults()  # the knobs of faults.py marked for the config
    # api.accounts whose token the emulator refuses (401), as if the clinic revoked it
    revoked_accounts: tuple[str, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _flat_knobs(cls, value: object) -> object:
        """The flat keys into ``behaviour``; ``fail_rate`` into ``faults``; knobs without a
        config key (faults.py) are unknown keys, as before."""
        if not isinstance(value, Mapping):
            return value
        value = dict(value)
        if "behaviour" in value:
            raise ValueError("behaviour: unknown key")
        faults = value.get("faults")
        if "fail_rate" in value:
            if isinstance(faults, Mapping) and "fail_rate" in faults:
                raise ValueError("fail_rate: give it here or as faults.fail_rate, not both")
            if faults is None or isinstance(faults, Mapping):
                value["faults"] = {**(faults or {}), "fail_rate": value.pop("fail_rate")}
        value["behaviour"] = {k: value.pop(k) for k in list(value) if k in behaviour_keys()}
        return value

    @field_validator("faults", mode="before")
    @classmethod
    def _config_knobs_only(cls, value: object) -> object:
        """Knobs without a config key (faults.py) are unknown keys here, as before."""
        if isinstance(value, Mapping):
            unknown = sorted(str(k) for k in value if k not in config_keys())
            if unknown:
                raise ValueError(f"{', '.join(unknown)}: unknown key")
        return value


# Behaviour's knobs a config cannot set (the emulator's own credentials, its other
# tokens): not part of what a config says, so not of its fingerprint.
_BEHAVIOUR_FLAGS_ONLY = frozenset(f.name for f in dataclasses.fields(Behaviour)) - behaviour_keys()


class LoggingConfig(_Section):
    """stderr logging: ``text`` lines for people, or ``json`` (one object a line, for a log
    shipper: pipeline/logs.py). ``--log-format`` on the command line wins over it."""

    format: Literal["text", "json"] = "text"


class NotifyConfig(_Section):
    """Who hears that a run ended (pipeline/notify.py): a Slack-compatible incoming-webhook
    URL (a secret: give it as ``${VAR}``), and/or a command (an argv list) that reads the
    summary JSON on stdin. A notification that fails is a warning, never a failed run."""

    url: SecretStr | None = None
    command: tuple[str, ...] = ()
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: SecretStr | None) -> SecretStr | None:
        # The value is a secret: the message says what is wrong, never what it is.
        if value is not None and not re.match(r"^https?://[^/\s]+", value.get_secret_value()):
            raise ValueError("must be an http(s) URL (an incoming-webhook URL)")
        return value


class SandboxConfig(_Section):
    enabled: bool = False
    wait_s: Annotated[float, Field(ge=0)] = 30.0
    emulator: EmulatorSettings = EmulatorSettings()


class RunConfig(_Section):
    """The whole validated config; each stage receives only its own section."""

    input: InputConfig = InputConfig()
    validation: ValidationConfig = ValidationConfig()
    api: ApiConfig = ApiConfig()
    submit: SubmitConfig = SubmitConfig()
    state: StateConfig = StateConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    poll: PollConfig = PollConfig()
    report: ReportConfig = ReportConfig()
    sandbox: SandboxConfig = SandboxConfig()
    logging: LoggingConfig = LoggingConfig()
    notify: NotifyConfig = NotifyConfig()

    @model_validator(mode="after")
    def _backoff_order(self) -> RunConfig:
        if self.submit.backoff_max_s < self.submit.backoff_base_s:
            raise ValueError("submit.backoff_max_s: must be >= submit.backoff_base_s")
        return self

    @model_validator(mode="after")
    def _account_column(self) -> RunConfig:
        column = self.input.columns.account
        if self.api.accounts is not None and not column:
            raise ValueError("input.columns.account: required with api.accounts (the CSV "
                             "column naming each row's account)")
        if self.api.accounts is None and column:
            raise ValueError("input.columns.account: only with api.accounts")
        if column and {column, "account"} & set(self.input.passthrough):
            raise ValueError("input.passthrough: names the account column, or one called "
                             "account (results.csv has an account column of its own)")
        return self

    def another_configs(self, label: str) -> bool:
        """Whether a run recorded under account ``label`` (``runs.account``: a name, or a
        several-clinic run's names joined with ",") is another config's: one of its names
        is in ``state.other_accounts`` and none is this config's, nor a former name. Its
        report, redrive.csv (note text) and unsent rows are that config's to handle."""
        names = {label, *label.split(",")}
        return (bool(names & set(self.state.other_accounts))
                and names.isdisjoint(self.api.known_names()))

    def fingerprint(self) -> str:
        """A hash of the effective config with every secret left out."""
        # Logging, metrics and notification settings change nothing sent: left out, so a
        # config gains them without a new fingerprint.
        data = self.model_dump(mode="json", exclude={"api": {"client_id", "client_secret",
                                                              "access_token", "accounts"},
                                                     "webhooks": {"secret", "secrets"},
                                                     "report": {"metrics_file"},
                                                     "state": {"url"},
                                                     "logging": True, "notify": True,
                                                     "sandbox": {"emulator": {
                                                         "behaviour": set(_BEHAVIOUR_FLAGS_ONLY)}}})
        if self.api.accounts is not None:  # the accounts without their tokens
            data["api"]["accounts"] = {
                name: a.model_dump(mode="json", exclude={"access_token"})
                for name, a in self.api.accounts.items()}
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def load_config(
    path: str | Path, *, needs: Iterable[str] = (), env: Mapping[str, str] | None = None
) -> RunConfig:
    """Read, resolve and validate a config file.

    ``needs`` names the sections whose ``${VAR}`` references must resolve
    (``api`` for run, validate and poll, ``webhooks`` for the sink); elsewhere an
    unset variable leaves the value empty (reconcile needs no secret). An empty
    file is a ConfigError naming ``input.path``.
    """
    raw = _read_yaml(Path(path))
    environ = os.environ if env is None else env
    problems: list[str] = []
    unset: dict[str, list[str]] = {}
    resolved = _resolve_env(raw, (), environ, tuple(needs), problems, unset=unset)
    if problems:  # every one at once: fixing them one run at a time wastes a night
        raise ConfigError("; ".join(problems))
    try:
        return RunConfig.model_validate(resolved)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, Path(path), unset)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}{where}: {problem}") from None
    if data is None:  # empty, or comments only: every default would be a guess
        raise ConfigError(f"{path}: the file is empty; input.path (the CSV to read) and the "
                          "api section are needed (configs/production.example.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _resolve_env(
    node: Any, where: tuple[str, ...], env: Mapping[str, str], needs: tuple[str, ...],
    problems: list[str], *, unset: dict[str, list[str]],
) -> Any:
    """``node`` with its ``${VAR}`` references replaced; in a section of ``needs``, each
    variable not set, or set but empty, is added to ``problems`` as ``key: ...``, naming
    the variable (an empty one is allowed only in ``webhooks.secrets``, the optional
    extra secrets of a rotation). Elsewhere a value naming a variable not set becomes
    None, its key (dotted) and the variables put in ``unset``: a key that cannot be None
    then says which variable is not set, not only that its value is wrong."""
    if isinstance(node, dict):
        return {k: _resolve_env(v, (*where, str(k)), env, needs, problems, unset=unset)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_env(v, (*where, str(i)), env, needs, problems,
                             unset=unset)
                for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node
    names = _ENV_REF.findall(node)
    missing = [name for name in names if name not in env]
    if missing:
        unset[".".join(where)] = missing
    # state.url always: unresolved, it would silently mean "state in local files"
    if (where[:1] and where[0] in needs) or where == ("state", "url"):
        key = ".".join(where)
        problems.extend(f"{key}: environment variable {name} is not set" for name in missing)
        if where[:2] != ("webhooks", "secrets"):
            problems.extend(f"{key}: environment variable {name} is set but empty"
                            for name in names if env.get(name) == "")
    if missing:
        return None
    return _ENV_REF.sub(lambda m: env[m.group(1)], node)


_KEYED = re.compile(r"^[a-z_]+(\.[A-Za-z0-9_.:-]+)*: ")
_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required",
    "literal_error": "must be one of {expected}",
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be text",
    "model_type": "must be a mapping of keys",
    "dataclass_type": "must be a mapping of keys",
    "tuple_type": "must be a list",
}


def _describe(exc: ValidationError, path: Path,
              unset: Mapping[str, list[str]] | None = None) -> str:
    """One line per problem: ``key: what is wrong`` (never the offending value); for a key
    whose value named an environment variable that is not set (``unset``), that."""
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = [str(p) for p in err["loc"]]
        if loc[:3] == ["sandbox", "emulator", "behaviour"]:  # its keys are flat in the YAML
            del loc[2]
        key = ".".join(loc) or "(top level)"
        template = _MESSAGES.get(err["type"])
        if unset and key in unset:
            message = ", ".join(f"environment variable {name} is not set"
                                for name in unset[key])
        elif template is not None:
            message = template.format(**(err.get("ctx") or {}))
        else:
            message = str(err["msg"]).removeprefix("Value error, ")
        if message.startswith(key + ": ") or (
                _KEYED.match(message) and (key == "(top level)"
                                            or message.startswith(key + "."))):
            lines.append(message)  # a check across keys names its own key
        else:
            lines.append(f"{key}: {message}")
    return f"{path}: " + "; ".join(lines)
