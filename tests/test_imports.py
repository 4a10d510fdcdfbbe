"""The package's import graph: no cycle (module-level and late imports alike), and the layers of
the architecture respected (kernels < core < tp < strategies < config/api < integrations < tools; kernels is a
leaf: no hf_seqpar module and no transformers)."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: source folder -> package name (setuptools' package-dir in pyproject.toml)
SOURCES = {"hf_seqpar": "hf_seqpar", "patches": "hf_seqpar.patches", "kernels": "hf_seqpar.kernels"}

#: package prefix -> prefixes it must not import (a layer never reaches above itself)
FORBIDDEN = {
    "hf_seqpar.core": (
        "hf_seqpar.strategies",
        "hf_seqpar.tp",
        "hf_seqpar.integrations",
        "hf_seqpar.tools",
        "hf_seqpar.config",
        "hf_seqpar.api",
        "hf_seqpar.patches",
    ),
    "hf_seqpar.kernels": (
        "hf_seqpar.core",
        "hf_seqpar.strategies",
        "hf_seqpar.tp",
        "hf_seqpar.integrations",
        "hf_seqpar.tools",
        "hf_seqpar.config",
        "hf_seqpar.api",
        "hf_seqpar.patches",
    ),
    "hf_seqpar.tp": (
        "hf_seqpar.strategies",
        "hf_seqpar.integrations",
        "hf_seqpar.tools",
        "hf_seqpar.config",
        "hf_seqpar.api",
        "hf_seqpar.patches",
    ),
    "hf_seqpar.patches": (
        "hf_seqpar.strategies",
        "hf_seqpar.integrations",
        "hf_seqpar.tools",
        "hf_seqpar.config",
        "hf_seqpar.api",
    ),
    "hf_seqpar.strategies": ("hf_seqpar.integrations", "hf_seqpar.tools", "hf_seqpar.config", "hf_seqpar.api"),
    "hf_seqpar.config": ("hf_seqpar.integrations", "hf_seqpar.tools", "hf_seqpar.api"),
    "hf_seqpar.api": ("hf_seqpar.integrations", "hf_seqpar.tools"),
    "hf_seqpar.integrations": ("hf_seqpar.tools",),
    "hf_seqpar.generation": ("hf_seqpar.integrations", "hf_seqpar.tools", "hf_seqpar.api", "hf_seqpar.config"),
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for folder, package in SOURCES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((package, *parts))] = path
    return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """hf_seqpar modules ``name`` imports anywhere in its body (late imports included)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in modules:  # "hf_seqpar.core.mesh.find_state" -> "hf_seqpar.core.mesh"
                t = t.rpartition(".")[0]
            if t and t != name and t != "hf_seqpar":
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycle():
    graph = _graph()
    assert len(graph) > 40, sorted(graph)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_layers_do_not_import_upwards():
    bad = []
    for name, deps in _graph().items():
        for prefix, forbidden in FORBIDDEN.items():
            if name == prefix or name.startswith(prefix + "."):
                bad += [f"{name} imports {d}" for d in deps if d.startswith(forbidden)]
    assert not bad, bad


def test_kernels_are_a_leaf():
    """kernels/ imports no other hf_seqpar module and not transformers (source and run time)."""
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("hf_seqpar.kernels"):
            assert all(d.startswith("hf_seqpar.kernels") for d in _imports(name, path, modules)), name
            nodes = ast.walk(ast.parse(path.read_text()))
            outside = [
                n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in nodes
                if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [n])
            ]
            assert not [m for m in outside if m and m.split(".")[0] == "transformers"], name
    code = (
        "import sys, hf_seqpar.kernels, hf_seqpar.kernels.varlen, hf_seqpar.kernels.backends\n"
        "bad = sorted(m for m in sys.modules if m.startswith('transformers') or m.startswith('hf_seqpar.')\n"
        "             and not m.startswith('hf_seqpar.kernels'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_module_imports_in_a_fresh_interpreter():
    """Every module imported in a fresh interpreter, deepest names first (the graph test above is
    what excludes cycles for every import order)."""
    _import_in_fresh_interpreters({"all": list(_modules())})


@pytest.mark.slow
def test_each_subpackage_imports_first_in_a_fresh_interpreter():
    """Each subpackage's modules imported first (an import order that would expose a cycle hidden by
    the package's own import order), one fresh interpreter per subpackage."""
    groups: dict[str, list[str]] = {}
    for name in _modules():
        groups.setdefault(".".join(name.split(".")[:2]), []).append(name)
    _import_in_fresh_interpreters(groups)


def _import_in_fresh_interpreters(groups: dict[str, list[str]]) -> None:
    for group, names in sorted(groups.items()):
        code = f"import importlib\nfor n in {sorted(names, reverse=True)!r}:\n    importlib.import_module(n)\n"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, f"{group}: {proc.stderr[-2000:]}"


def test_every_module_says_its_role():
    missing = [
        name for name, path in _modules().items() if not (ast.get_docstring(ast.parse(path.read_text())) or "").strip()
    ]
    assert not missing, f"modules without a docstring: {missing}"


def test_no_strategy_name_branch_outside_the_strategies():
    """Code outside ``hf_seqpar/strategies`` asks the strategy object, never compares its name."""
    import re

    names = "ulysses|ring|hybrid|megatron"
    pattern = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    hits = []
    for folder in ("hf_seqpar", "patches", "kernels", "recipes"):
        for path in (ROOT / folder).rglob("*.py"):
            if "strategies" in path.relative_to(ROOT).parts:
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, hits


def test_a_fifth_strategy_is_one_class_and_one_table_line(monkeypatch):
    """Registering a new class in the table is enough for the config, the cost model and the planner."""
    from hf_seqpar import strategies
    from hf_seqpar.config import SequenceParallelConfig, resolve
    from hf_seqpar.core.shape import ModelShape
    from hf_seqpar.strategies.ulysses import UlyssesStrategy
    from hf_seqpar.tools import plan, theory

    class Fifth(UlyssesStrategy):
        name = "fifth"
        description = "a copy of Ulysses under another name"

    monkeypatch.setitem(strategies.STRATEGIES, "fifth", Fifth)
    resolve(SequenceParallelConfig(strategy="fifth"), 4)
    with pytest.raises(ValueError, match="strategy 'fifth' does not take option"):
        SequenceParallelConfig(strategy="fifth", layout="zigzag")
    shape = ModelShape(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=100)
    assert theory.comm_bytes("fifth", shape, 64, 4) == theory.comm_bytes("ulysses", shape, 64, 4)
    labels = [c.label for c in plan.candidates(shape, plan.Cluster(gpus=4))]
    assert "fifth 4" in labels and "ulysses 4" in labels


def test_kernels_directory_defers_to_an_installed_kernels_package(tmp_path):
    """From the repository root (on sys.path under ``python -m``/``-c``) ``import kernels`` is the
    installed top-level ``kernels`` package (Hugging Face's, which transformers >= 5.25 imports), not
    this repository's kernels/ directory, which is hf_seqpar.kernels (here a stand-in package on
    PYTHONPATH, after the root)."""
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("MARK = 'installed'\nfrom .layer import LAYER\n")
    (fake / "layer.py").write_text("LAYER = 'its own submodule'\n")
    code = (
        "import sys, kernels\n"
        "assert sys.path[0] == '', sys.path[:2]\n"
        "print(kernels.MARK, '|', kernels.LAYER, '|', hasattr(kernels, 'block_forward'), '|', kernels.__file__)\n"
        "import hf_seqpar.kernels as ours\n"
        "print(hasattr(ours, 'block_forward'), '|', ours.__file__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs, ours = proc.stdout.strip().splitlines()[-2:]
    assert theirs.split(" | ")[:3] == ["installed", "its own submodule", "False"], theirs
    assert theirs.split(" | ")[3] == str(fake / "__init__.py")
    assert ours.split(" | ")[0] == "True" and ours.split(" | ")[1] == str(ROOT / "kernels" / "__init__.py")
