"""``notify``: a PHI-free summary when a run ends, to a chat webhook and/or a command.

``notify.url`` receives ``POST {"text": "..."}`` (JSON), the body a Slack incoming
webhook takes (https://api.slack.com/messaging/webhooks; Mattermost, Rocket.Chat
and Teams' Slack-compatible hooks take it too). The URL is a secret (whoever has it
may post to the channel): it comes from ``${VAR}`` in the config and is never
printed or logged, not even in a warning. ``notify.command`` (an argv list, run
without a shell) reads ``RunSummary.to_dict()`` as JSON on stdin.

The summary holds counts, the exit code, the run id, the report directory, the
stop reason and the open items: never a note's text, a task id or a secret.
A notification that fails (no answer, a non-2xx answer, a timeout, a command
that exits non-zero or cannot be started) is one warning line in the log, and
changes neither the run's outcome nor its exit code.

The POST is bounded whatever the other end does: ``timeout_s`` is a deadline for the
whole exchange (connect, send, the answer's status line and headers), not per read;
the answer's body is never read (only its status counts), so an endless or huge body
costs nothing; a redirect is not followed (its status is the answer). While it runs,
the records of httpx and httpcore (whose INFO line quotes the URL) are dropped, in
this thread only, so a host whose root logger is at INFO or DEBUG (an Airflow
worker, ``tasknotes -vv``) never logs the secret.
"""

from __future__ import annotations

import contextvars
import json
import logging
import subprocess
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import httpx

from pipeline.config import NotifyConfig
from pipeline.reconciliation import FINAL_STATUS_LABELS

log = logging.getLogger(__name__)



_VERDICTS = {"ok": "ok", "waiting": "waiting for outcomes", "attention": "needs attention"}
# The loggers of the HTTP stack that may quote a request's URL: httpx's INFO
# "HTTP Request: POST <url>" line, httpcore's DEBUG traces.
_HTTP_LOGGERS: Final = ("httpx", "httpcore", "httpcore.connection", "httpcore.http11",
                        "httpcore.http2", "httpcore.proxy", "httpcore.socks")
_POSTING: contextvars.ContextVar[bool] = contextvars.ContextVar("tasknotes_notify_posting",
                                                                default=False)


class _QuietWhilePosting(logging.Filter):
    """Drops the HTTP stack's records logged while a notification is being posted (in
    that context only: other threads' and tasks' httpx records pass)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _POSTING.get()


_QUIET: Final = _QuietWhilePosting()


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What a notification says about one ended run.

    ``counts``: rows by final status; ``open_items``: ``tasknotes status``'s counts by
    kind over every run (non-zero ones); ``report_dir``: where the report is, None when
    it was not written; ``stop_reason``: why the run stopped early (None: it did not).
    """

    run_id: str
    exit_code: int
    counts: dict[str, int]
    report_dir: str | None
    stop_reason: str | None = None
    open_items: dict[str, int] = field(default_factory=dict)
    verdict: str | None = None  # summary.json's: ok | waiting | attention (None: no report)

    def to_dict(self) -> dict[str, Any]:
        """The JSON ``notify.command`` reads on stdin (fields only ever added)."""
        return {"event": "run_ended", "run_id": self.run_id, "exit_code": self.exit_code,
                "verdict": self.verdict,
                "counts": dict(self.counts), "rows": sum(self.counts.values()),
                "report_dir": self.report_dir, "stop_reason": self.stop_reason,
                "open_items": dict(self.open_items), "text": self.text()}

    def text(self) -> str:
        """One chat message: verdict (the report's, as summary.json has it), counts, open
        items, report."""
        if self.exit_code == 3:
            verdict = "aborted"
        elif self.verdict is not None:
            verdict = _VERDICTS.get(self.verdict, self.verdict)
        else:
            verdict = {0: "ok", 1: "needs attention"}.get(self.exit_code, "failed")
        lines = [f"tasknotes run {self.run_id}: {verdict} (exit {self.exit_code})"]
        labels: dict[str, str] = {str(k): v for k, v in FINAL_STATUS_LABELS.items()}
        shown = [f"{n:,} {labels.get(k, k)}" for k, n in self.counts.items() if n]
        lines.append(f"{sum(self.counts.values()):,} rows: " + ("; ".join(shown) or "none"))
        if self.stop_reason:
            lines.append(f"stopped: {self.stop_reason}")
        open_shown = [f"{n:,} {k}" for k, n in self.open_items.items() if n]
        if open_shown:
            lines.append("open over all runs: " + ", ".join(open_shown))
        if self.report_dir:
            lines.append(f"report: {self.report_dir}")
        return "\n".join(lines)


def notify(settings: NotifyConfig, summary: RunSummary) -> list[str]:
    """Send ``summary`` to ``settings.url`` and/or ``settings.command``; never raises for
    a failed delivery. Returns the problems met, each also logged as a warning line
    (empty: delivered, or nothing configured)."""
    problems: list[str] = []
    if settings.url is not None and settings.url.get_secret_value():
        problem = _post(settings.url.get_secret_value(), summary, settings.timeout_s)
        if problem:
            problems.append(f"notify.url: {problem}; no notification sent there")
    if settings.command:
        problem = _run(settings.command, summary, settings.timeout_s)
        if problem:
            problems.append(f"notify.command: {problem}")
    for problem in problems:
        log.warning("%s", problem, extra={"event": "notify_failed"})
    return problems


def _post(url: str, summary: RunSummary, timeout_s: float) -> str | None:
    """POST the chat message within ``timeout_s`` overall; what went wrong, in words that
    never hold the URL. Blocks the calling thread (its own event loop, ``anyio.run``)."""
    for name in _HTTP_LOGGERS:
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)

    async def post() -> int | None:
        _POSTING.set(True)  # this task's context only
        with anyio.move_on_after(timeout_s):
            async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client, \
                    client.stream("POST", url, json={"text": summary.text()}) as answer:
                return answer.status_code  # the body is not read: leaving closes it
        return None

    try:
        status = anyio.run(post)
    except httpx.TimeoutException:
        status = None
    except httpx.HTTPError as exc:  # its message may quote the URL: the kind of error only
        return f"could not be reached ({type(exc).__name__})"
    if status is None:
        return f"no answer within {timeout_s:g} s"
    if not 200 <= status < 300:
        return f"answered HTTP {status}"
    return None


def _run(argv: tuple[str, ...], summary: RunSummary, timeout_s: float) -> str | None:
    """Run the command with the summary JSON on stdin; what went wrong, if anything."""
    data = json.dumps(summary.to_dict()).encode()
    try:
        done = subprocess.run(argv, input=data, capture_output=True, timeout=timeout_s,  # noqa: S603 - the operator's own argv, no shell
                              check=False)
    except subprocess.TimeoutExpired:
        return f"{argv[0]} did not end within {timeout_s:g} s"
    except OSError as exc:
        return f"{argv[0]} could not be started ({exc.strerror or type(exc).__name__})"
    if done.returncode != 0:
        return f"{argv[0]} exited with code {done.returncode}"
    return None
