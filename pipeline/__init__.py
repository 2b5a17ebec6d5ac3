"""tasknotes: append notes to EMR tasks through Cobalt, and prove what happened to every row.

The Python API (the README's "Use from Python"), the same front doors the ``tasknotes``
command calls (jobs.py)::

    import pipeline

    result = pipeline.run("configs/sandbox.yaml")   # -> pipeline.RunResult
    result.exit_code, result.run_id, result.report_dir, result.counts, result.stop_reason

    pipeline.validate(config, inputs=())            # -> RunResult (a dry run's scan)
    pipeline.reconcile(config, run_id=None)         # -> ReconcileResult
    pipeline.poll(config, run_id=None)              # -> PollResult
    pipeline.status(config)                         # -> StatusResult
    pipeline.prune(config, older_than_days=None)    # -> PruneOutcome (dry_run=True: a preview)
    await pipeline.aio.run(config)                  # the same, inside an event loop

``config`` is a path to the YAML file or a ``RunConfig`` (``pipeline.load_config``).
Errors are the ``PipelineError`` tree (``ConfigError``, ``InputError``, ``StateError``,
``RunAborted``...; errors.py), each with its ``exit_code``; never SystemExit. Nothing
here prints or configures logging: records go to the ``pipeline`` loggers (which have
a NullHandler) for the host's own logging to handle.

No module of this package is named like a front door (the stages are validation.py,
polling.py, reconciliation.py, open_items.py, retention.py), so ``import pipeline.X``
never hides one of these functions.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from pipeline._version import __version__
from pipeline.errors import (
    ApiError,
    ConfigError,
    CredentialsRefused,
    InputError,
    PipelineError,
    RunAborted,
    StateError,
    StorageFull,
)

if TYPE_CHECKING:
    from pipeline import aio as aio
    from pipeline import logs as logs
    from pipeline.config import RunConfig as RunConfig
    from pipeline.config import load_config as load_config
    from pipeline.jobs import ConfigSource as ConfigSource
    from pipeline.jobs import PollResult as PollResult
    from pipeline.jobs import PruneOutcome as PruneOutcome
    from pipeline.jobs import ReconciledRun as ReconciledRun
    from pipeline.jobs import ReconcileResult as ReconcileResult
    from pipeline.jobs import RunResult as RunResult
    from pipeline.jobs import StatusResult as StatusResult
    from pipeline.jobs import poll as poll
    from pipeline.jobs import prune as prune
    from pipeline.jobs import reconcile as reconcile
    from pipeline.jobs import run as run
    from pipeline.jobs import status as status
    from pipeline.jobs import validate as validate
    from pipeline.jobs import write_off as write_off

__all__ = [
    "ApiError",
    "ConfigError",
    "ConfigSource",
    "CredentialsRefused",
    "InputError",
    "PipelineError",
    "PollResult",
    "PruneOutcome",
    "ReconcileResult",
    "ReconciledRun",
    "RunAborted",
    "RunConfig",
    "RunResult",
    "StateError",
    "StatusResult",
    "StorageFull",
    "__version__",
    "aio",
    "load_config",
    "logs",
    "poll",
    "prune",
    "reconcile",
    "run",
    "status",
    "validate",
    "write_off",
]

# Where each lazily loaded name lives: `import pipeline` (and so every `tasknotes`
# command, `sink` and `emulator` included) does not pay for importing every stage.
_LAZY = {
    "aio": ("pipeline.aio", None),
    "logs": ("pipeline.logs", None),
    "RunConfig": ("pipeline.config", "RunConfig"),
    "load_config": ("pipeline.config", "load_config"),
    **{name: ("pipeline.jobs", name) for name in (
        "ConfigSource", "PollResult", "PruneOutcome", "ReconciledRun", "ReconcileResult",
        "RunResult", "StatusResult", "poll", "prune", "reconcile", "run", "status",
        "validate", "write_off")},
}


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use (PEP 562)."""
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    module = importlib.import_module(where[0])
    value = module if where[1] is None else getattr(module, where[1])
    globals()[name] = value
    return value


logging.getLogger(__name__).addHandler(logging.NullHandler())  # the host decides the rest
