"""The layering of docs/DESIGN.md, checked on the import graph (AST, imports inside functions included):

- no import cycles between the project's modules;
- `passes/` and `exporters/` never import torch (they are pure ONNX graph code);
- click is reachable only from `qtool.cli` (the API never imports it);
- no module imports another module's private (`_name`) names.

Each rule is shown able to fail on a planted violation in a temporary tree.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qtool", "passes", "exporters")
TORCH_FREE = ("passes", "exporters")
CLI_MODULES = ("qtool.cli", "qtool.__main__")


@dataclass
class ImportGraph:
    modules: dict[str, Path]
    edges: dict[str, set[str]] = field(default_factory=dict)
    external: dict[str, set[str]] = field(default_factory=dict)  # module -> top-level third-party names
    private: list[str] = field(default_factory=list)  # "importer: module._name"


def _module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def build_graph(root: Path) -> ImportGraph:
    modules = {_module_name(root, p): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}
    g = ImportGraph(modules)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps, ext = set(), set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [(mod, a.name) for a in node.names]
            else:
                continue
            for mod, imported in targets:
                top = mod.split(".")[0]
                if top not in PACKAGES:
                    ext.add(top)
                    continue
                sub = f"{mod}.{imported}" if imported else None
                if sub in modules:  # `from pkg import submodule` depends on the submodule
                    deps.add(sub)
                    continue
                while mod and mod not in modules:  # `import a.b.c` of a function-level name
                    mod = mod.rpartition(".")[0]
                if mod:
                    deps.add(mod)
                if imported and imported.startswith("_") and not imported.startswith("__") and mod != name:
                    g.private.append(f"{name}: {mod}.{imported}")
        deps.discard(name)
        g.edges[name], g.external[name] = deps, ext
    return g


def cycles(g: ImportGraph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g.modules):
        if v not in index:
            visit(v)
    return out


def reachable(g: ImportGraph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo.extend(g.edges.get(v, ()))
    return seen


def violations(root: Path) -> list[str]:
    g = build_graph(root)
    found = [f"import cycle: {' <-> '.join(c)}" for c in cycles(g)]
    found += [f"torch imported in {m}" for m in g.modules
              if m.split(".")[0] in TORCH_FREE and "torch" in g.external[m]]
    api = reachable(g, "qtool")
    found += [f"click reachable from the API: {m}" for m in sorted(api) if "click" in g.external[m]]
    found += [f"click imported outside the CLI: {m}" for m in g.modules
              if "click" in g.external[m] and m not in CLI_MODULES]
    found += [f"private import {p}" for p in g.private]
    return found


def test_the_project_respects_its_layers():
    assert violations(ROOT) == []


def _planted(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    return tmp_path


def test_a_planted_cycle_inside_a_function_is_found(tmp_path):
    root = _planted(tmp_path, {"qtool/a.py": "from qtool.b import x\n",
                               "qtool/b.py": "def x():\n    from qtool.a import y\n"})
    assert violations(root) == ["import cycle: qtool.a <-> qtool.b"]


def test_planted_torch_click_and_private_imports_are_found(tmp_path):
    root = _planted(tmp_path, {"passes/p.py": "import torch\n",
                               "exporters/e.py": "def f():\n    import torch.nn\n",
                               "qtool/__init__.py": "def __getattr__(n):\n    from qtool import api\n",
                               "qtool/api.py": "from qtool.helper import _secret\n",
                               "qtool/helper.py": "import click\n_secret = 1\n",
                               "qtool/cli.py": "import click\n"})
    found = violations(root)
    assert "torch imported in passes.p" in found and "torch imported in exporters.e" in found
    assert "click reachable from the API: qtool.helper" in found
    assert "click imported outside the CLI: qtool.helper" in found
    assert "private import qtool.api: qtool.helper._secret" in found
    assert not any("qtool.cli" in v for v in found)  # the CLI may import click


def test_importing_the_api_loads_neither_click_nor_the_cli():
    code = ("import sys, qtool; qtool.fuse, qtool.quantize, qtool.qat, qtool.export, qtool.search, qtool.dynamic, "
            "qtool.evaluate, qtool.bench, qtool.QuantPlan, qtool.QtoolError; "
            "assert 'click' not in sys.modules, 'click'; assert 'qtool.cli' not in sys.modules, 'cli'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_onnx_only_stages_do_not_import_torch():
    """quantize / export / eval / bench and every config run without torch: importing it costs seconds on
    each CLI call. The planted import shows the check can fail."""
    base = ("import sys, qtool; qtool.fuse, qtool.quantize, qtool.export, qtool.evaluate, qtool.bench; "
            "qtool.QuantConfig(), qtool.QATConfig(), qtool.ExportConfig(), qtool.EvalConfig(), qtool.FuseConfig(); "
            "import qtool.cli; {plant}assert 'torch' not in sys.modules, 'torch'")
    subprocess.run([sys.executable, "-c", base.format(plant="")], check=True, cwd=ROOT)
    planted = subprocess.run([sys.executable, "-c", base.format(plant="qtool.DynamicConfig; ")], cwd=ROOT,
                             capture_output=True, text=True)
    assert planted.returncode != 0 and "AssertionError: torch" in planted.stderr


def test_fuse_runs_onnxsim_without_loading_torch():
    """onnxsim 0.8 tries `import torch` at import (an optional integration); fuse keeps it out, ~3 s per
    `qtool fuse`, and torch still imports afterwards in the same process."""
    code = ("import sys, onnx; from onnx import helper as h, TensorProto as T; import qtool; "
            "x = h.make_tensor_value_info('x', T.FLOAT, [1, 4]); y = h.make_tensor_value_info('y', T.FLOAT, [1, 4]); "
            "g = h.make_graph([h.make_node('Shape', ['x'], ['s']), h.make_node('Reshape', ['x', 's'], ['y'])], 'g', [x], [y]); "
            "m = h.make_model(g, opset_imports=[h.make_opsetid('', 17)]); "
            "out = qtool.fuse(m).model; assert 'onnxsim' in sys.modules, 'onnxsim not run'; "
            "assert 'Shape' not in [n.op_type for n in out.graph.node], 'not simplified'; "
            "assert 'torch' not in sys.modules, 'torch'; import torch; torch.zeros(1)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
