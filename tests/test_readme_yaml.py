"""Every YAML snippet of the README and docs/ parses: a reader copies them into a config.
A block whose info string says ``yaml fragment`` is exempt (none is, today)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```(yaml|yml)([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def yaml_blocks() -> list[tuple[str, str]]:
    """(``file:line``, text) of each fenced yaml block not marked as a fragment."""
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in _BLOCK.finditer(text):
            if "fragment" in match.group(2):
                continue
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{path.name}:{line}", match.group(3)))
    return found


def test_the_readme_has_yaml_snippets() -> None:
    """The extraction finds the snippets (an empty list would pass the test below)."""
    assert len(yaml_blocks()) >= 2


@pytest.mark.parametrize(("where", "text"), yaml_blocks(), ids=[w for w, _ in yaml_blocks()])
def test_each_yaml_snippet_parses(where: str, text: str) -> None:
    """yaml.safe_load takes the block as written (``${VAR}`` is expanded after parsing, so
    inside a flow mapping it must be quoted)."""
    assert isinstance(yaml.safe_load(text), dict), where
