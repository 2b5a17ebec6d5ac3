"""Airflow DAGs for tasknotes: send at night, settle and check the next morning.

Three DAGs (copy this file into the DAGs folder; set TASKNOTES_CONFIG, TASKNOTES_WORKDIR
and, for the CLI variant, TASKNOTES_BIN in the worker's environment or edit the
constants). TASKNOTES_WORKDIR is the directory the commands run in: relative paths in
the config (state.ledger, webhooks.sink, report.dir) are relative to it, so with the
local ledger it must be the one cron or systemd uses, or the task would use a new,
empty ledger and send again what was already sent. It is never guessed from the
config's path (/etc/tasknotes/...). With ``state.url`` (README, "Shared state on
PostgreSQL") the ledger and the events live in the database: any directory will do
(a fresh worker's empty one), only report.dir is written there.

    tasknotes_nightly       02:15  PythonOperator on the Python API: ``pipeline.run``
    tasknotes_nightly_cli   02:15  the same with BashOperator and the ``tasknotes``
                                   command, for workers without tasknotes' Python
                                   environment (enable one of the two, not both)
    tasknotes_morning       07:00  a sensor on ``tasknotes status --json`` until no
                                   note awaits an outcome (or 3 hours pass), then
                                   ``poll``, ``reconcile`` and a last ``status``

Exit codes in Airflow terms (README, "Operating it"): 0 success; 1 the command
finished but some rows need a person (rejected, failed in the EMR, ambiguous,
stale): the task SUCCEEDS and logs a warning, since retrying cannot fix a row and
the report says which; 2 refused before anything was sent: the task FAILS; a bad
config or input (ConfigError, InputError) fails the same way until someone edits it,
but a StateError may pass (another run holds the account's lock; with ``state.url``
the database was unreachable), so it is retried; 3 the run was aborted (credentials
refused, Cobalt kept failing, the database lost, disk full, killed): the task FAILS,
and a retry is safe (the ledger never sends a note twice).

Retries: the PythonOperator raises AirflowFailException for exit 2 from a ConfigError
or InputError (Airflow fails the task without retrying) and AirflowException for a
StateError and for exit 3 (retried once, 20 minutes later). A BashOperator cannot
retry by exit code (any non-zero exit is retried alike), so the CLI variant has no
retry: after an exit 3, or an exit 2 whose line names the lock or the database, clear
the task or let the next night send what is left. The morning sensor keeps waiting
through a StateError (its 3 hours bound it).

``pipeline.run(config) -> RunResult`` is tasknotes' Python API (README, "Use from
Python"): a frozen result with ``exit_code``, ``run_id``, ``report_dir``, ``counts``
and ``stop_reason``; exit 2 is raised instead (``ConfigError``, ``InputError``,
``StateError``: each a ``PipelineError`` with its ``exit_code``), which fails the
task. It runs in whatever thread the worker calls it from: in the main thread it
handles SIGTERM (Airflow's kill) as the command does, a graceful stop with exit 3,
and puts Airflow's own handler back afterwards; in another thread it installs none.
The morning sensor calls ``pipeline.status`` where tasknotes is importable, and the
command (TASKNOTES_BIN) where it is not.
It never configures logging: its records reach the task log through Airflow's own
handlers. The module imports ``pipeline`` only inside the task, so the scheduler
parses it where tasknotes is not installed.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from datetime import datetime, timedelta
from typing import Any

from airflow import DAG
from airflow.exceptions import AirflowException, AirflowFailException

try:  # Airflow 3: the standard provider
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.providers.standard.sensors.python import PythonSensor
except ImportError:  # Airflow 2
    from airflow.operators.bash import BashOperator  # type: ignore[no-redef]
    from airflow.operators.python import PythonOperator  # type: ignore[no-redef]
    from airflow.sensors.python import PythonSensor  # type: ignore[no-redef]

CONFIG = os.environ.get("TASKNOTES_CONFIG", "/srv/tasknotes/configs/production.yaml")
TASKNOTES = os.environ.get("TASKNOTES_BIN", "/srv/tasknotes/.venv/bin/tasknotes")
# Where the commands run: the config's relative paths are relative to it (module docstring).
WORKDIR = os.environ.get("TASKNOTES_WORKDIR", "/srv/tasknotes")

log = logging.getLogger(__name__)

# A run that ended with exit 1 succeeds with a warning; 2 and 3 fail the task.
_WARN_ON_1 = """
cd {workdir} && {bin} --log-format json {command} {config} {extra}
code=$?
if [ "$code" -eq 1 ]; then
  echo "tasknotes {command}: exit 1: some rows need attention; see the report"
  exit 0
fi
exit "$code"
"""


def _cli(command: str, extra: str = "") -> str:
    return _WARN_ON_1.format(workdir=WORKDIR, bin=TASKNOTES, command=command, config=CONFIG,
                             extra=extra)


def send_notes(config_path: str) -> dict[str, Any]:
    """The nightly run through the Python API; its result goes to XCom (no note text)."""
    import pipeline  # noqa: PLC0415 - on the worker only

    # Relative paths in the config are relative to the current directory, as for the
    # command (cd WORKDIR above); a task runs in a process of its own, so it may chdir.
    os.chdir(WORKDIR)
    try:
        result = pipeline.run(config_path)
    except pipeline.StateError as exc:  # exit 2, maybe passing: the lock, the database
        raise AirflowException(f"tasknotes run: {exc} (exit 2, retried)") from exc
    except pipeline.PipelineError as exc:  # ConfigError, InputError...: exit 2
        if exc.exit_code == 2:  # retrying fails the same way: fail now, no retry
            raise AirflowFailException(f"tasknotes run: {exc} (exit 2)") from exc
        raise  # RunAborted (exit 3): the task fails and is retried once
    summary = {"run_id": result.run_id, "exit_code": result.exit_code,
               "report_dir": str(result.report_dir), "counts": dict(result.counts),
               "stop_reason": result.stop_reason}
    if result.exit_code == 3:
        raise AirflowException(f"tasknotes run aborted: {result.stop_reason}")
    if result.exit_code == 1:
        log.warning("tasknotes run %s: some rows need attention; see %s", result.run_id,
                    result.report_dir)
    return summary


def outcomes_settled(config_path: str) -> bool:
    """The sensor's test: nothing awaits an outcome and no run is in progress (``status
    --json``'s shape, README: it is stable): ``pipeline.status`` where tasknotes is
    importable, else the command. Through the API a bad config fails the sensor at once
    and a StateError or RunAborted (the database unreachable, or lost while status read
    it) waits for the next poke. The command's exit 2 says either, and 3 the database
    lost: both wait for the next poke, the line logged at each one (a bad config would
    have failed the night's run already; the sensor's timeout bounds the wait); any
    other exit but 0 and 1 fails the sensor."""
    try:
        import pipeline  # noqa: PLC0415 - on the worker only
    except ImportError:
        try:
            done = subprocess.run([TASKNOTES, "status", config_path, "--json"],  # noqa: S603
                                  cwd=WORKDIR, capture_output=True, text=True, timeout=600,
                                  check=False)
        except OSError as exc:  # TASKNOTES_BIN wrong: no poke can mend it
            raise AirflowFailException(f"cannot run {TASKNOTES} (TASKNOTES_BIN): "
                                       f"{exc.strerror or exc}") from None
        if done.returncode in (2, 3):  # the database unreachable or lost, or a bad config
            log.warning("tasknotes status exited %d: %s; asking again at the next poke",
                        done.returncode, done.stderr.strip())
            return False
        if done.returncode not in (0, 1):
            raise AirflowFailException(
                f"tasknotes status exited {done.returncode}: {done.stderr}") from None
        try:
            kinds = json.loads(done.stdout)["kinds"]
        except (ValueError, KeyError, TypeError):
            raise AirflowFailException(f"{TASKNOTES} status --json did not print its JSON "
                                       "shape: is TASKNOTES_BIN tasknotes?") from None
    else:
        os.chdir(WORKDIR)
        try:
            kinds = pipeline.status(config_path).to_dict()["kinds"]
        except (pipeline.StateError, pipeline.RunAborted) as exc:  # the database unreachable
            # or lost while status read it: poke again later
            log.warning("tasknotes status: %s; asking again at the next poke", exc)
            return False
        except pipeline.PipelineError as exc:
            raise AirflowFailException(f"tasknotes status: {exc}") from exc
    return bool(kinds["awaiting_outcome"]["count"] == 0 and kinds["in_progress"]["count"] == 0)


_DEFAULTS = {"owner": "emr-integrations", "retries": 0}

with DAG(
    dag_id="tasknotes_nightly",
    description="Append the night's notes to EMR tasks through Cobalt (Python API)",
    schedule="15 2 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # the ledger's run lock would refuse a second one anyway
    default_args=_DEFAULTS,
    tags=["tasknotes"],
) as nightly:
    PythonOperator(task_id="run", python_callable=send_notes, op_args=[CONFIG],
                   retries=1, retry_delay=timedelta(minutes=20))  # a retry after exit 3

with DAG(
    dag_id="tasknotes_nightly_cli",
    description="Append the night's notes to EMR tasks through Cobalt (the command)",
    schedule="15 2 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=_DEFAULTS,
    tags=["tasknotes"],
) as nightly_cli:
    # retries=0: a BashOperator would retry exit 2 as well (module docstring)
    BashOperator(task_id="run", bash_command=_cli("run", "--no-progress"), retries=0)

with DAG(
    dag_id="tasknotes_morning",
    description="Settle last night's notes: wait for outcomes, poll, reconcile, status",
    schedule="0 7 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=_DEFAULTS,
    tags=["tasknotes"],
) as morning:
    settled = PythonSensor(
        task_id="wait_for_outcomes", python_callable=outcomes_settled, op_args=[CONFIG],
        mode="reschedule", poke_interval=15 * 60, timeout=3 * 3600,
        # No soft_fail: Airflow would turn every failure of the sensor into SKIPPED, exit
        # 2 included. Still waiting after 3 h, the sensor fails (red, worth a look) and
        # poll runs anyway (trigger_rule all_done) to ask Cobalt; the DAG run's colour
        # is the last status task's.
    )
    poll = BashOperator(task_id="poll", bash_command=_cli("poll"), trigger_rule="all_done")
    reconcile = BashOperator(task_id="reconcile", bash_command=_cli("reconcile"))
    # The last word: exit 1 (something open) FAILS this task on purpose, so the DAG run
    # is red while a person has something to do; `tasknotes status` says what.
    status = BashOperator(task_id="status",
                          bash_command=f"cd {WORKDIR} && {TASKNOTES} status {CONFIG}")
    settled >> poll >> reconcile >> status
