"""The one exception tree of tasknotes.

    PipelineError                   the CLI catches this root; never a traceback for it
    ├── ConfigError                 bad YAML, key or value; missing ${VAR}     -> exit 2
    ├── InputError                  input missing, empty, unreadable, bad header -> exit 2
    ├── StateError                  ledger or sink file unusable, run lock held  -> exit 2
    │   └── SinkWriteError          an event could not be stored (events.py): the sink's 503
    ├── CannotListen                host:port cannot be listened on (servers.py) -> exit 2
    ├── RunAborted                  credentials refused, too many failures, signal -> exit 3
    │   ├── StorageFull             no space left where the ledger is: nothing more recorded
    │   └── UnreadableEvents        a page of GET /v1/webhook-events poll cannot read (polling.py)
    └── ApiError                    one Cobalt request went wrong (retry.py decides what next)
        ├── CredentialsRefused      401/403: every further request would fail too
        ├── RequestRejected         other 4xx: Cobalt read the request and refused this row
        ├── NotApplied              provably did not take effect: safe to send again
        │   ├── NotSent             connect error or connect/pool timeout
        │   ├── RateLimited         429 (carries Retry-After)
        │   └── Unavailable         503 (carries Retry-After)
        └── OutcomeUnknown          may have taken effect: never resent blindly
            ├── ServerError         500, 502, 504 and other 5xx
            ├── NoResponse          read/write timeout, connection lost after sending
            └── BadResponse         a 2xx whose body is not the documented JSON

Foreign exceptions (httpx, aiohttp, OSError, yaml, pydantic) are translated
into this tree at the edge that meets them, with ``raise ... from exc``.
Messages never carry a note's text or a secret.
"""

from __future__ import annotations

from typing import ClassVar

from pipeline import exits


class PipelineError(Exception):
    """Root of every error tasknotes raises on purpose.

    ``exit_code``: the process's exit code for this error, a plain class constant
    (``exits.USAGE``; ``exits.ABORTED`` for RunAborted) that ``exits.for_error`` reads.
    """

    exit_code: ClassVar[int] = exits.USAGE


class ConfigError(PipelineError):
    """The config file cannot be used; the message names the YAML key."""


class InputError(PipelineError):
    """An input file cannot be read at all (row problems are values, not errors)."""


class StateError(PipelineError):
    """The ledger or the sink file cannot be used as it stands."""


class RunAborted(PipelineError):
    """The run stopped early; rows not started stay pending for the next run."""

    exit_code: ClassVar[int] = exits.ABORTED


class StorageFull(RunAborted):
    """A disk is full (ENOSPC, SQLite's SQLITE_FULL): nothing more can be recorded, so
    nothing more may be sent. The message names the file that could not be written."""


class ApiError(PipelineError):
    """One request to Cobalt did not end in an accepted note.

    ``code`` is a short, fixed name for the kind of failure; reports and the
    ledger keep it with the HTTP status and Cobalt's message (redacted, client.py).
    ``retry_after``: seconds the server asked us to wait before asking again
    (its ``Retry-After`` header, RFC 9110 §10.2.3, read by ``client.retry_after``);
    None when it did not say. Only a 429 or 503 (``NotApplied``) carries one;
    retry.py decides what it means for the next attempt.
    """

    code = "api-error"

    def __init__(self, message: str, *, http_status: int | None = None,
                 retry_after: float | None = None, own: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.retry_after = retry_after
        self._own = own

    @property
    def own(self) -> str:
        """Our own words for this failure, with nothing upstream wrote: for an error that
        quotes Cobalt's message, the ``own`` it was raised with (``HTTP <status> <code>``,
        e.g. ``HTTP 400 request-rejected``); for any other, its whole message (tasknotes'
        own text). For text that travels further than the ledger's row (a stop reason, a
        log line, a notification): Cobalt's message may name a task or a patient even once
        the note and the secrets are redacted out of it."""
        return self.message if self._own is None else self._own


class CredentialsRefused(ApiError):
    """401/403: the credentials are wrong or lack access; stop the run."""

    code = "credentials-refused"


class RequestRejected(ApiError):
    """A 4xx other than 401/403/429: Cobalt refused this row as sent."""

    code = "request-rejected"


class NotApplied(ApiError):
    """The request provably did not take effect, so it may be sent again."""


class NotSent(NotApplied):
    """The request never left: no connection could be made or borrowed in time."""


class RateLimited(NotApplied):
    """429 Too Many Requests."""

    code = "rate-limited"


class Unavailable(NotApplied):
    """503 Service Unavailable."""

    code = "unavailable"


class OutcomeUnknown(ApiError):
    """The request may have reached Cobalt, but no usable answer came back."""


class ServerError(OutcomeUnknown):
    """A 5xx other than 503: Cobalt may have stored the note before failing."""

    code = "server-error"


class NoResponse(OutcomeUnknown):
    """The request was (or may have been) sent, then the answer never came."""


class BadResponse(OutcomeUnknown):
    """A success status with a body that is not the documented JSON."""

    code = "bad-response"
