"""examples/airflow: the DAG file parses as Airflow parses it (where Airflow is installed),
and imports tasknotes only inside its tasks (so a scheduler without it can load it)."""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest

DAG_FILE = Path(__file__).parent.parent / "examples" / "airflow" / "tasknotes_dags.py"


def test_the_dag_file_imports_tasknotes_only_inside_its_tasks() -> None:
    tree = ast.parse(DAG_FILE.read_text(encoding="utf-8"), filename=str(DAG_FILE))
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] == "pipeline"]


def test_airflow_loads_the_three_dags() -> None:
    models = pytest.importorskip("airflow.models", reason="Airflow is not installed: the DAG "
                                                          "file is parsed by Airflow only there")
    bag = models.DagBag(dag_folder=str(DAG_FILE), include_examples=False)
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"tasknotes_nightly", "tasknotes_nightly_cli",
                                "tasknotes_morning"}
    morning = bag.get_dag("tasknotes_morning")
    assert [t.task_id for t in morning.topological_sort()] == [
        "wait_for_outcomes", "poll", "reconcile", "status"]


def test_the_dag_file_uses_the_python_api_as_it_is() -> None:
    """Without Airflow too: every ``pipeline.X`` the DAG file calls is in the API, and every
    field it reads off the RunResult exists (the file was once written against a plan)."""
    import dataclasses  # noqa: PLC0415

    import pipeline  # noqa: PLC0415

    tree = ast.parse(DAG_FILE.read_text(encoding="utf-8"), filename=str(DAG_FILE))
    used: dict[str, set[str]] = {"pipeline": set(), "result": set()}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in used):
            used[node.value.id].add(node.attr)
    assert used["pipeline"] == {"run", "status", "PipelineError", "StateError", "RunAborted"}
    assert set(pipeline.__all__) >= used["pipeline"]
    fields = {f.name for f in dataclasses.fields(pipeline.RunResult)}
    assert used["result"] >= {"exit_code", "run_id", "report_dir", "counts", "stop_reason"}
    assert fields >= used["result"]


class _Stub:
    """Stands for an Airflow class the DAG file only instantiates (no Airflow here)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.kwargs = kwargs

    def __enter__(self) -> _Stub:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __rshift__(self, other: object) -> object:
        return other


def _dag_module(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Any:
    """The DAG file imported with Airflow's names stubbed (the exceptions real classes),
    ``env`` in the environment; returns the module."""
    exceptions = types.ModuleType("airflow.exceptions")

    class AirflowException(Exception):
        pass

    class AirflowFailException(AirflowException):
        pass

    exceptions.AirflowException = AirflowException  # type: ignore[attr-defined]
    exceptions.AirflowFailException = AirflowFailException  # type: ignore[attr-defined]
    modules = {"airflow": types.ModuleType("airflow"), "airflow.exceptions": exceptions}
    modules["airflow"].DAG = _Stub  # type: ignore[attr-defined]
    for name, attrs in {"airflow.providers.standard.operators.bash": ["BashOperator"],
                        "airflow.providers.standard.operators.python": ["PythonOperator"],
                        "airflow.providers.standard.sensors.python": ["PythonSensor"]}.items():
        modules[name] = types.ModuleType(name)
        for attr in attrs:
            setattr(modules[name], attr, _Stub)
    for name in ("airflow.providers", "airflow.providers.standard",
                 "airflow.providers.standard.operators", "airflow.providers.standard.sensors"):
        modules[name] = types.ModuleType(name)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location("tasknotes_dags_under_test", DAG_FILE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exit_2_fails_the_task_without_retry_and_the_workdir_is_explicit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config error (exit 2) raises AirflowFailException (Airflow: fail, no retry); the
    working directory is TASKNOTES_WORKDIR, never derived from the config's path (which
    for /etc/tasknotes/production.yaml would be /)."""
    monkeypatch.chdir(tmp_path)
    dags = _dag_module(monkeypatch, {"TASKNOTES_CONFIG": "/etc/tasknotes/production.yaml",
                                     "TASKNOTES_WORKDIR": str(tmp_path)})
    assert str(tmp_path) == dags.WORKDIR
    fail = sys.modules["airflow.exceptions"].AirflowFailException
    with pytest.raises(fail, match="exit 2"):
        dags.send_notes(str(tmp_path / "missing.yaml"))
    with pytest.raises(fail):
        dags.outcomes_settled(str(tmp_path / "missing.yaml"))
    assert Path.cwd() == tmp_path


def test_a_state_error_is_retried_and_the_sensor_pokes_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 2 from a StateError may pass (the database unreachable, the lock held): the run
    task raises AirflowException (retried), not AirflowFailException; the sensor says "not
    yet" instead of failing."""
    pytest.importorskip("psycopg", reason="state.url needs the [postgres] extra")
    from helpers import free_port, write_config  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)
    dags = _dag_module(monkeypatch, {"TASKNOTES_WORKDIR": str(tmp_path)})
    config = write_config(tmp_path, state={
        "url": f"postgresql://u:pw-3e1a@127.0.0.1:{free_port()}/tasknotes"})
    (tmp_path / "input.csv").write_text("emr_task_id,note\nT1,hello\n")
    exceptions = sys.modules["airflow.exceptions"]
    with pytest.raises(exceptions.AirflowException, match="cannot connect") as caught:
        dags.send_notes(str(config))
    assert not isinstance(caught.value, exceptions.AirflowFailException)
    assert "pw-3e1a" not in str(caught.value)
    assert dags.outcomes_settled(str(config)) is False


def test_where_tasknotes_is_not_importable_the_sensor_pokes_again_on_exit_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sensor's fallback to the command (a worker that cannot import tasknotes): the
    database unreachable is exit 2 there too, and the sensor says "not yet" (it failed
    at once, no retry, on a database restart: newcomer finding)."""
    pytest.importorskip("psycopg", reason="state.url needs the [postgres] extra")
    from helpers import free_port, write_config  # noqa: PLC0415

    command = Path(sys.executable).with_name("tasknotes")
    monkeypatch.chdir(tmp_path)
    dags = _dag_module(monkeypatch, {"TASKNOTES_WORKDIR": str(tmp_path),
                                     "TASKNOTES_BIN": str(command)})
    monkeypatch.setitem(sys.modules, "pipeline", None)  # import pipeline: ImportError
    config = write_config(tmp_path, state={
        "url": f"postgresql://u:pw-3e1a@127.0.0.1:{free_port()}/tasknotes"})
    assert dags.outcomes_settled(str(config)) is False


@pytest.mark.parametrize(("code", "pokes_again"), [(2, True), (3, True), (4, False)])
def test_the_sensors_command_fallback_pokes_again_on_exit_2_and_3_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, pokes_again: bool) -> None:
    """``tasknotes status`` exits 3 when the database goes away while it reads (a restart at
    07:00): the sensor asks again at the next poke, as for exit 2; any other failure fails
    it (retest finding: exit 3 failed the sensor at once). A stand-in command exits with
    ``code``."""
    command = tmp_path / "tasknotes"
    command.write_text(f"#!/bin/sh\necho 'tasknotes: state.url: lost' >&2\nexit {code}\n")
    command.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    dags = _dag_module(monkeypatch, {"TASKNOTES_WORKDIR": str(tmp_path),
                                     "TASKNOTES_BIN": str(command)})
    monkeypatch.setitem(sys.modules, "pipeline", None)  # import pipeline: ImportError
    if pokes_again:
        assert dags.outcomes_settled(str(tmp_path / "c.yaml")) is False
    else:
        with pytest.raises(sys.modules["airflow.exceptions"].AirflowFailException,
                           match="exited 4"):
            dags.outcomes_settled(str(tmp_path / "c.yaml"))


def test_the_sensor_pokes_again_when_the_database_goes_away_while_status_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the API: RunAborted (exit 3, the connection lost while status read) is a
    poke-again, as StateError is."""
    import pipeline  # noqa: PLC0415

    def lost(config: str) -> None:
        raise pipeline.RunAborted("state.url: lost the connection to PostgreSQL")
    monkeypatch.chdir(tmp_path)
    dags = _dag_module(monkeypatch, {"TASKNOTES_WORKDIR": str(tmp_path)})
    monkeypatch.setattr(pipeline, "status", lost)
    assert dags.outcomes_settled(str(tmp_path / "c.yaml")) is False


@pytest.mark.parametrize(("script", "says"), [
    (None, "cannot run"),  # TASKNOTES_BIN names nothing
    ("#!/bin/sh\nexit 0\n", "did not print its JSON shape"),  # not tasknotes
])
def test_a_wrong_tasknotes_bin_fails_the_sensor_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str | None, says: str) -> None:
    """A TASKNOTES_BIN that is missing or is not tasknotes fails the sensor with a line
    saying so, not a FileNotFoundError or JSONDecodeError from inside the DAG file."""
    command = tmp_path / "tasknotes"
    if script is not None:
        command.write_text(script)
        command.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    dags = _dag_module(monkeypatch, {"TASKNOTES_WORKDIR": str(tmp_path),
                                     "TASKNOTES_BIN": str(command)})
    monkeypatch.setitem(sys.modules, "pipeline", None)  # import pipeline: ImportError
    with pytest.raises(sys.modules["airflow.exceptions"].AirflowFailException, match=says):
        dags.outcomes_settled(str(tmp_path / "c.yaml"))
