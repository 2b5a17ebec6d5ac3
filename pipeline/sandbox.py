"""A sandbox run: the emulator and the webhook sink, in-process, on free loopback ports.

With ``sandbox.enabled`` (configs/sandbox.yaml), ``run`` needs no account:
requests go to the emulator, the emulator's webhooks go to a real sink
(signature checked, events fsync'ed to ``webhooks.sink``), and the run waits,
at most ``sandbox.wait_s``, until every accepted row has its outcome.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from pipeline.config import RunConfig
from pipeline.emulator import Emulator, EmulatorOptions
from pipeline.errors import ConfigError
from pipeline.faults import knob_values
from pipeline.retry import Control
from pipeline.servers import serve_embedded
from pipeline.sink import WebhookReceiver
from pipeline.state import OutcomeStore
from pipeline.state.store import open_event_store

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Sandbox:
    """The running sandbox: where to send, and a way to wait for the outcomes."""

    base_url: str
    emulator: Emulator
    ledger: OutcomeStore
    run_id: str
    wait_s: float
    _arrived: set[str] = field(default_factory=set)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    def stored(self, event: dict[str, Any]) -> None:
        """The sink stored an event (called by the receiver, in the event loop)."""
        if str(event.get("type", "")).startswith("task_note.") and event.get("job_id"):
            self._arrived.add(str(event["job_id"]))
            self._changed.set()

    async def wait_for_outcomes(self, control: Control) -> int:
        """Wait until each accepted row of the run has an outcome; returns how many lack one."""
        expected = self.ledger.job_ids(self.run_id)
        missing = expected - self._arrived
        with anyio.move_on_after(self.wait_s):
            while missing and not control.stopped:
                self._changed = changed = anyio.Event()
                with control.also_setting(changed):
                    await changed.wait()
                missing = expected - self._arrived
        if missing:
            log.warning("%d accepted rows have no outcome after %.0f s (sandbox.wait_s)",
                        len(missing), self.wait_s)
        return len(missing)


def emulator_options(config: RunConfig, webhook_url: str) -> EmulatorOptions:
    """The emulator, told the same credentials and webhook secret as the config."""
    client_id, client_secret, access_token = config.api.credentials()
    # api.accounts: every account's token, its reference id reference_id (else its name)
    tokens = tuple((config.api.credentials(name)[2], a.reference_id or name)
                   for name, a in (config.api.accounts or {}).items())
    e = config.sandbox.emulator
    secrets = config.webhooks.all_secrets()
    if not secrets:
        raise ConfigError("webhooks.secret: a sandbox run needs a webhook secret")
    return EmulatorOptions(
        **knob_values(e.behaviour, config_only=True),
        client_id=client_id, client_secret=client_secret, access_token=access_token,
        webhook_url=webhook_url, webhook_secret=secrets[0].decode(), faults=e.faults,
        tokens=tokens,
        revoked=frozenset(config.api.credentials(name)[2] for name in e.revoked_accounts),
    )


@contextlib.asynccontextmanager
async def sandboxed(config: RunConfig, ledger: OutcomeStore, run_id: str
                    ) -> AsyncIterator[Sandbox | None]:
    """Yields a running Sandbox when the config enables one, else None."""
    if not config.sandbox.enabled:
        yield None
        return
    sink = open_event_store(config)  # the sandbox's outcomes go where runs read them
    holder: list[Sandbox] = []
    receiver = WebhookReceiver(
        sink, config.webhooks.all_secrets(), path=config.webhooks.path,
        max_body_bytes=config.webhooks.max_body_bytes,
        on_stored=lambda event: holder[0].stored(event) if holder else None,
    )
    try:
        async with anyio.create_task_group() as tg:  # noqa: SIM117 - the emulator needs the sink's URL
            async with serve_embedded(receiver.app(), tg,
                                      **receiver.serve_options()) as sink_server:
                emulator = Emulator(emulator_options(config,
                                                     sink_server.url + config.webhooks.path))
                async with serve_embedded(emulator.app(), tg,
                                          attach=lambda s: setattr(emulator, "server", s)) as api:
                    log.info("sandbox: emulator at %s, webhook sink at %s", api.url,
                             sink_server.url)
                    holder.append(Sandbox(api.url, emulator, ledger, run_id,
                                          config.sandbox.wait_s))
                    yield holder[0]
    finally:
        sink.close()
