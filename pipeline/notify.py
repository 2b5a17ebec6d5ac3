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
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass, field
from typing import Any

import httpx

from pipeline.config import NotifyConfig
from pipeline.reconcile import FINAL_STATUS_LABELS

log = logging.getLogger(__name__)



_VERDICTS = {"ok": "ok", "waiting": "waiting for outcomes", "attention": "needs attention"}


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
        shown = [f"{n:,} {FINAL_STATUS_LABELS.get(k, k)}" for k, n in self.counts.items() if n]
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
    """POST the chat message; what went wrong, in words that never hold the URL."""
    try:
        answer = httpx.post(url, json={"text": summary.text()}, timeout=timeout_s,
                            follow_redirects=False)
    except httpx.TimeoutException:
        return f"no answer within {timeout_s:g} s"
    except httpx.HTTPError as exc:  # its message may quote the URL: the kind of error only
        return f"could not be reached ({type(exc).__name__})"
    if not answer.is_success:
        return f"answered HTTP {answer.status_code}"
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
