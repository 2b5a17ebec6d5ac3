"""docs/architecture.md lists every module of the package (the README's Development section
points there instead of keeping a list of its own that falls behind)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_architecture_page_names_every_module() -> None:
    """Each pipeline/*.py and pipeline/state/*.py is named in the page's module list (the
    first code block after "## Stages and data flow"), so a module added without a line
    there fails here."""
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = page.split("## Stages and data flow", 1)[1]
    listing = section.split("```", 2)[1]
    named = set(re.findall(r"[\w]+\.py\b", listing))
    modules = {p.name for p in (ROOT / "pipeline").glob("*.py")}
    modules |= {p.name for p in (ROOT / "pipeline" / "state").glob("*.py")} - {"__init__.py"}
    assert modules - named == set()
