"""examples/airflow: the DAG file parses as Airflow parses it (where Airflow is installed),
and imports tasknotes only inside its tasks (so a scheduler without it can load it)."""

from __future__ import annotations

import ast
from pathlib import Path

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
    assert used["pipeline"] == {"run"}
    assert set(pipeline.__all__) >= used["pipeline"]
    fields = {f.name for f in dataclasses.fields(pipeline.RunResult)}
    assert used["result"] >= {"exit_code", "run_id", "report_dir", "counts", "stop_reason"}
    assert fields >= used["result"]
