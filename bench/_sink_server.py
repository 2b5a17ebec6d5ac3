"""The webhook sink for bench/sink.py and bench/slowloris.py.

    python bench/_sink_server.py PORT DIR fsync|nofsync [FD_LIMIT]
    python bench/_sink_server.py PORT DIR postgres STATE_URL
    python bench/_sink_server.py PORT DIR bare

The real WebhookReceiver and SinkFile, served by uvicorn on the server CPU; with
'nofsync' the file is written the same way but never fsync'ed (the baseline); with
'postgres' the events go to the sink's store in that database (``state.url``,
``PgEventStore``), as ``tasknotes sink`` does with ``state.url`` set; with 'bare' the
same uvicorn and protocol (the receiver's serve_options) serve an ASGI app that reads
each body and answers 200 without checking or storing it: what HTTP alone costs.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import SERVER_CPU, pin
from pipeline.events import SinkFile
from pipeline.servers import serve_foreground
from pipeline.sink import EventStore, WebhookReceiver
from pipeline.state.pg_events import PgEventStore

SECRET = b"bench-secret"


async def bare(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers every request 200 once its body is in; nothing checked, nothing stored."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"received":true,"result":"stored"}'})


def main() -> None:
    port, directory, mode = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    if mode != "postgres" and len(sys.argv) > 4:  # a hard open-file limit, as `ulimit -n`
        limit = int(sys.argv[4])
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    pin(SERVER_CPU)
    sink: SinkFile | PgEventStore
    if mode == "postgres":
        sink = PgEventStore(sys.argv[4])
    else:
        sink = SinkFile(directory / "webhooks.jsonl",
                        fsync=os.fsync if mode == "fsync" else (lambda fd: None))
    sink.open()
    store: EventStore = sink
    receiver = WebhookReceiver(store, [SECRET])
    import logging

    logging.getLogger("pipeline").setLevel(logging.WARNING)
    serve_foreground(bare if mode == "bare" else receiver.app(), host="127.0.0.1", port=port,
                     **receiver.serve_options())


if __name__ == "__main__":
    main()
