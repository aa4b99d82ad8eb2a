"""The library never reaches the tools: `clipft.inference`, `export`, `embed`, `preprocess`, `model` and
`search/` import nothing of `clipft.train`, `clipft.eval` or `clipft.cli`, transitively, counting the
imports inside functions (a deferred import runs as soon as that function is called) and the package
`__init__` files an import runs. Read from the source with `ast`, so nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LIBRARY = ["clipft.inference", "clipft.export", "clipft.embed", "clipft.preprocess", "clipft.model", "clipft.search"]
TOOLS = ("clipft.train", "clipft.eval", "clipft.cli")


def module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _is_package(name: str) -> bool:
    f = module_file(name)
    return f is not None and f.name == "__init__.py"


def imports_of(name: str) -> set[str]:
    """The clipft modules `name` imports anywhere in its file (top level, functions, TYPE_CHECKING
    blocks), resolved to absolute names, plus the packages those imports run."""
    f = module_file(name)
    package = name if _is_package(name) else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            for a in node.names:  # `from . import x` / `from .data import records`: x may be a module
                if module_file(f"{mod}.{a.name}") is not None:
                    out.add(f"{mod}.{a.name}")
    found = set()
    for m in out:
        if m == "clipft" or m.startswith("clipft."):
            parts = m.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))  # parents run first
    return {m for m in found if module_file(m) is not None}


def import_chains(start: str) -> dict[str, list[str]]:
    """Every clipft module reachable from `start`, with one chain of imports that reaches it."""
    chains = {start: [start]}
    todo = [start]
    # the parents of `start` run when it is imported, too
    parts = start.split(".")
    for i in range(1, len(parts)):
        parent = ".".join(parts[:i])
        if parent not in chains:
            chains[parent] = [parent]
            todo.append(parent)
    while todo:
        m = todo.pop()
        for n in sorted(imports_of(m)):
            if n not in chains:
                chains[n] = chains[m] + [n]
                todo.append(n)
    return chains


def _library_modules() -> list[str]:
    out = []
    for name in LIBRARY:
        out.append(name)
        if _is_package(name):
            pkg = module_file(name).parent
            out += [f"{name}.{p.stem}" for p in sorted(pkg.glob("*.py")) if p.stem != "__init__"]
    return out


def test_the_import_reader_sees_deferred_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "clipft"
    (pkg / "train").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text("")
    (pkg / "lib.py").write_text("def f():\n    from .train import loop\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path)
    assert "clipft.train.loop" in import_chains("clipft.lib")


@pytest.mark.parametrize("start", _library_modules())
def test_the_library_does_not_reach_the_tools(start):
    reached = {m: chain for m, chain in import_chains(start).items() if m.startswith(TOOLS)}
    assert reached == {}, "\n".join(" -> ".join(chain) for chain in reached.values())
