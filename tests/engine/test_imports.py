"""Imports point one way, as docs/engine.md draws them (issue 29): ``kernels`` and ``controller`` never import
``engine`` nor each other; the engine's core never imports its embedded lab (the lab plugs in by name, exactly as a
user's task would); no engine module imports one in a layer above its own in docs/engine.md's picture; and there is
no import circle among the engine's modules. Every import counts, those inside functions too."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = sorted((ROOT / "engine").glob("*.py"))  # every engine module outside engine/lab/
DOC = ROOT / "docs" / "engine.md"


def imported_modules(path: Path, package: str | None = None) -> set[str]:
    """Every module an ``import``, ``from ... import`` (names included, relative ones resolved against
    ``package``, default: the file's own) or ``importlib.import_module("...")`` / ``__import__("...")`` with
    a literal name in ``path`` can load."""
    package = package or "atesd." + ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def module_name(path: Path) -> str:
    """``atesd.engine.lab.task`` for engine/lab/task.py (``atesd.engine`` for engine/__init__.py)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return "atesd." + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_graph(packages=("engine", "kernels", "controller")) -> dict[str, set[str]]:
    """{module: the project modules it imports} for every module of ``packages``; an imported name resolves to
    the longest project module it starts with (``from atesd.engine.task import Task`` -> atesd.engine.task)."""
    paths = {module_name(p): p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))}
    graph = {}
    for name, path in paths.items():
        deps = set()
        for imported in imported_modules(path):
            imported = imported.replace("atesd.", "", 1) if imported.startswith("atesd.") else imported
            imported = "atesd." + imported if imported.split(".")[0] in packages else imported
            owners = [m for m in paths if imported == m or imported.startswith(m + ".")]
            if owners:
                deps.add(max(owners, key=len))
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted: an import circle."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def doc_layers() -> list[tuple[str, list[str]]]:
    """The layers of docs/engine.md's picture, top first: ``[(name, [module, ...]), ...]`` from the fenced block
    after the line ``<!-- engine layers -->``."""
    text = DOC.read_text()
    block = re.search(r"<!-- engine layers -->\s*```text\n(.*?)```", text, re.S)
    assert block, "docs/engine.md lost its layer picture (<!-- engine layers --> then a ```text block)"
    layers = []
    for line in block.group(1).splitlines():
        if line.strip() and not line.startswith(" "):
            name, _, modules = line.partition("|")
            layers.append((name.strip(), modules.split()))
    return layers


def is_lab(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in ("atesd.engine.lab", "engine.lab"))


def test_the_checker_sees_every_import_form(tmp_path):
    probe = tmp_path / "probe.py"  # parsed only, as if it were a module of atesd.engine
    probe.write_text("import atesd.engine.lab\nfrom atesd.engine import lab\nfrom .lab import task\n"
                     "import importlib\nimportlib.import_module('atesd.engine.lab.recipe')\n")
    found = imported_modules(probe, package="atesd.engine")
    assert {"atesd.engine.lab", "atesd.engine.lab.task", "atesd.engine.lab.recipe"} <= found


def test_no_core_module_imports_the_lab():
    assert {p.name for p in CORE} >= {"exposure.py", "models.py", "data.py", "evaluate.py", "evaluator.py",
                                      "train.py", "config.py", "scoring.py", "task.py"}
    offenders = {p.name: sorted(m for m in imported_modules(p) if is_lab(m)) for p in CORE}
    assert not {k: v for k, v in offenders.items() if v}


BLOCKED = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "atesd.engine.lab" or name.startswith("atesd.engine.lab."):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import atesd.engine.train, atesd.engine.evaluate, atesd.engine.evaluator, atesd.engine.sweep
from atesd.engine.invocation import parse
from atesd.engine.task import get_task
cfg, _ = parse(["--model", "qwen3-1.7b", "--data", "someorg/math-rows"])  # a hub id: parsed, not loaded
assert cfg.task == "math" and cfg.eval_benchmarks == "aime24,aime25,hmmt25"
try:
    get_task("lab")
except ValueError as e:
    assert "atesd.engine.lab.recipe" in str(e), e
else:
    raise AssertionError("the lab loaded although it is blocked")
print("core ok without the lab")
"""


def test_core_works_without_the_lab(tmp_path):
    """With engine.lab made unimportable, the core imports, parses a run and names the missing plug-in."""
    out = subprocess.run([sys.executable, "-c", BLOCKED], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "core ok without the lab" in out.stdout


def test_the_cycle_finder_finds_circles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_kernels_and_controller_never_import_the_engine_nor_each_other():
    graph = project_graph()
    for pkg, forbidden in (("kernels", ("engine", "controller")), ("controller", ("engine", "kernels"))):
        crossing = {m: sorted(d for d in deps if d.split(".")[1] in forbidden)
                    for m, deps in graph.items() if m.split(".")[1] == pkg}
        assert not {m: d for m, d in crossing.items() if d}, crossing


def test_no_import_circle_among_the_engines_modules():
    graph = {m: {d for d in deps if d.startswith("atesd.engine")} for m, deps in project_graph(("engine",)).items()}
    assert set(graph) >= {"atesd.engine.trainer", "atesd.engine.run", "atesd.engine.lab.recipe"}
    assert cycles(graph) == []


def upward_imports(graph: dict[str, set[str]], layers: list[tuple[str, list[str]]]) -> list[str]:
    """The imports of ``graph`` (engine modules outside the lab) that reach a layer above the importer's."""
    depth = {m: i for i, (_, modules) in enumerate(reversed(layers)) for m in modules}
    name = {m: layer for layer, modules in layers for m in modules}
    short = lambda m: m.split(".")[-1] if m.count(".") == 2 and m != "atesd.engine" else None  # noqa: E731
    return [
        f"{short(m)} ({name[short(m)]}) imports {short(d)} ({name[short(d)]})"
        for m, deps in graph.items() if short(m) in depth
        for d in deps if short(d) in depth and depth[short(d)] > depth[short(m)]
    ]


def test_imports_follow_the_layers_drawn_in_docs_engine_md():
    """Every engine module (outside the lab) is in exactly one layer of the picture, and imports only modules of
    its own layer or of the layers below it."""
    layers = doc_layers()
    drawn = [m for _, modules in layers for m in modules]
    assert len(drawn) == len(set(drawn)), "a module is drawn twice"
    core = {p.stem for p in CORE} - {"__init__"}
    assert set(drawn) == core, f"drawn, not a module: {sorted(set(drawn) - core)}; undrawn: {sorted(core - set(drawn))}"
    assert upward_imports(project_graph(("engine",)), layers) == []


def test_the_layer_check_catches_an_upward_import(tmp_path):
    probe = tmp_path / "probe.py"  # parsed as if it were engine/errors.py, of the lowest layer
    probe.write_text("def f():\n    from atesd.engine.trainer import Trainer\n    return Trainer\n")
    graph = {"atesd.engine.errors": {m for m in imported_modules(probe, "atesd.engine") if m.count(".") == 2}}
    layers = doc_layers()
    assert upward_imports(graph, layers) == [f"errors ({layers[-1][0]}) imports trainer (the step)"]


def test_static_tools_see_the_atesd_names(tmp_path):
    """Editors and type checkers cannot follow atesd/__init__.py's ``__path__`` (nor the editable install's import
    hook): ``make editor`` (part of ``make setup``) links the checkout's packages as build/editor/atesd, which
    pyproject.toml's [tool.pyright] extraPaths names. A plain path lookup there, as a static tool makes it, finds
    every ``atesd.*`` module at its file in the checkout."""
    import importlib.machinery
    import shutil

    if shutil.which("make") is None:
        pytest.skip("needs make")
    for name in ("atesd", "kernels", "engine", "controller"):  # a checkout's layout, without writing into this one
        (tmp_path / name).symlink_to(ROOT / name)
    out = subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "editor"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    tree = str(tmp_path / "build" / "editor")
    for module, path in (("atesd.engine.trainer", "engine/trainer.py"), ("atesd.kernels", "kernels/__init__.py"),
                         ("atesd.controller.beta", "controller/beta.py"), ("atesd.engine.lab.recipe",
                                                                           "engine/lab/recipe.py")):
        search, spec = [tree], None
        for depth in range(1, module.count(".") + 2):
            spec = importlib.machinery.PathFinder.find_spec(".".join(module.split(".")[:depth]), search)
            assert spec is not None, module
            search = spec.submodule_search_locations
        assert os.path.realpath(spec.origin) == str(ROOT / path)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'\[tool\.pyright\][^\[]*extraPaths = \["build/editor"\]', pyproject)
    assert re.search(r"^setup: .*\beditor\b", (ROOT / "Makefile").read_text(), re.M)
