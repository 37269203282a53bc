"""The import contract checker (.ci/check_imports.py, run by ``make lint``) holds for the tree and catches breaches."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT


def _checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_check_imports", ROOT / ".ci" / "check_imports.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tree_keeps_the_contract() -> None:
    assert _checker().check() == []


def _plant(tmp_path: Path, checker: ModuleType, monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> list[str]:
    """Run the checker on a copy of the tree with ``files`` (relative paths -> source) added."""
    sources = {}
    for package, folder in checker.SOURCES.items():
        copy = tmp_path / folder.relative_to(ROOT)
        for path in folder.rglob("*.py"):
            target = copy / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text())
        sources[package] = copy
    for relative, text in files.items():
        (tmp_path / relative).write_text(text)
    monkeypatch.setattr(checker, "SOURCES", sources)
    monkeypatch.setattr(checker, "ROOT", tmp_path)
    problems: list[str] = checker.check()
    return problems


@pytest.mark.parametrize(
    ("files", "needle"),
    [
        ({"ranger_ps/algorithm/planted.py": "import ranger_ps.client.sharded\n"}, "lower layer"),
        ({"ranger_ps/optim/planted.py": "def f():\n    from ranger_ps.server import app\n"}, "higher layer"),
        ({"ranger_ps/algorithm/planted.py": "import grpc\n"}, "must not import grpc"),
        ({"ranger_ps/wire/planted.py": "from ranger_ps.storage import checkpoint\n"}, "siblings"),
        (
            {
                "ranger_ps/algorithm/cycle_a.py": "from ranger_ps.algorithm import cycle_b\n",
                "ranger_ps/algorithm/cycle_b.py": "from ranger_ps.algorithm import cycle_a\n",
            },
            "import cycle",
        ),
        ({"ranger_ps/planted.py": "x = 1\n"}, "in no layer"),
    ],
    ids=["upward", "library-imports-app", "algorithm-grpc", "siblings", "cycle", "unlayered"],
)
def test_a_planted_breach_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str], needle: str
) -> None:
    problems = _plant(tmp_path, _checker(), monkeypatch, files)
    assert any(needle in p for p in problems), problems
