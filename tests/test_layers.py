"""The layers: runners -> algorithms -> data, and metarun.errors below them all. No module
imports against the arrows, at the top or inside a function. Run it alone with
`python -m pytest tests/test_layers.py`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# a layer may import the layers after it in this list, never those before it
LAYERS = ("runners", "algorithms", "data", "errors")


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "metarun" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def modules():
    for layer in ("runners", "algorithms", "data"):
        for path in sorted((REPO / layer).glob("*.py")):
            yield layer, path
    yield "errors", REPO / "metarun" / "errors.py"


@pytest.mark.parametrize("layer, path", list(modules()), ids=lambda v: getattr(v, "name", v))
def test_no_import_runs_against_the_layers(layer, path):
    allowed = LAYERS[LAYERS.index(layer) :]
    package = f"metarun.{layer}" if layer != "errors" else "metarun"
    against = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for line, module in imports(path, package)
        if (target := layer_of(module)) is not None and target not in allowed
    ]
    assert not against, "\n".join(against)


def test_test_modules_do_not_import_each_other():
    """Shared helpers live in conftest.py (composition, CLI runs), fakes.py (data files on
    disk) and wandb_records.py; a test module imports none of the others."""
    tests = Path(__file__).resolve().parent
    offenders = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.name} imports {n}" for n in names if n.startswith("test_")]
    assert not offenders
