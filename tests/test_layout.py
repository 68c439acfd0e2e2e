"""The package's layers, read from its imports with `ast` (no module is imported).

    science   models, losses, steps, metrics, stats, augmentation, quality measures, the op's API:
              imports the standard library, torch, numpy and other science modules only
    data      reading, splitting, caching, the synthetic generator, encoding, weight files
    experiment  trainers, translation, the pipeline's stages, the report, the CLIs
    plumbing  melano/infra/: imports the standard library, torch, numpy (and tqdm when installed), and no
              other layer

Imports flow one way (experiment -> data -> science, and everything -> plumbing), and no module
imports itself back through others: lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "melano"

SCIENCE = {"gan", "detector", "efficientnet", "ops", "augment", "schedules", "pixels", "metrics", "stats", "quality",
           "lesions", "saliency"}
DATA = {"data", "synth", "encode", "pretrained"}
EXPERIMENT = {"cyclegan", "classifier", "translate", "pipeline", "report", "quality_stage"}
THIRD_PARTY = {"science": {"torch", "numpy"}, "plumbing": {"torch", "numpy", "tqdm"}}  # tqdm: optional


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def layer(name: str) -> str:
    """melano.x -> its layer; melano.infra.* is plumbing; a package's __main__ (its CLI) is experiment."""
    parts = name.split(".")
    if parts[:2] == ["melano", "infra"]:
        return "plumbing"
    if parts[-1] == "__main__":
        return "experiment"
    short = parts[1] if len(parts) > 1 else ""
    for title, members in (("science", SCIENCE), ("data", DATA), ("experiment", EXPERIMENT)):
        if short in members:
            return title
    return "package" if name == "melano" else "unknown"


def imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module, line) of every import in the file, top-level or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from melano import x` imports the module melano.x when x is one
            subs = [f"{base}.{a.name}" for a in node.names if (PKG.parent / f"{base}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
                    or (PKG.parent / f"{base}.{a.name}".replace(".", "/") / "__init__.py").exists()]
            found += [(s, node.lineno) for s in subs] or [(base, node.lineno)]
    return found


def graph() -> dict[str, list[tuple[str, int]]]:
    return {module_name(p): imports(p) for p in sorted(PKG.rglob("*.py"))}


ALLOWED = {  # layer -> the melano layers it may import
    "science": {"science"},
    "data": {"science", "data", "plumbing", "package"},
    "experiment": {"science", "data", "experiment", "plumbing", "package"},
    "plumbing": {"plumbing", "package"},
    "package": set(),
}


def test_every_module_has_a_layer():
    unknown = [m for m in graph() if layer(m) == "unknown"]
    assert not unknown, f"modules in no layer (add them to a set in tests/test_layout.py): {unknown}"


def test_imports_flow_one_way():
    wrong = []
    for mod, deps in graph().items():
        mine = layer(mod)
        for dep, line in deps:
            top = dep.split(".")[0]
            if top == "melano":
                if layer(dep) not in ALLOWED[mine] and dep != mod:
                    wrong.append(f"{mod}:{line} ({mine}) imports {dep} ({layer(dep)})")
            elif mine in THIRD_PARTY and top not in sys.stdlib_module_names and top not in THIRD_PARTY[mine]:
                wrong.append(f"{mod}:{line} ({mine}) imports the third-party {top}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_cycles():
    imported = graph()
    g = {m: sorted({d for d, _ in deps if d in imported and d != m}) for m, deps in imported.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in g[m]:
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in g:
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("bad, expected", [
    ("from .infra import cli\n", "science"),       # science may not use the plumbing
    ("from . import data\n", "science"),           # nor the data layer
])
def test_the_check_can_fail(tmp_path, monkeypatch, bad, expected):
    """The rules above catch a wrong arrow: a science module importing plumbing or data."""
    fake = PKG / "metrics.py"
    text = fake.read_text()
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (bad + text) if self == fake else
                        Path.read_bytes(self).decode())
    with pytest.raises(AssertionError, match=expected):
        test_imports_flow_one_way()
