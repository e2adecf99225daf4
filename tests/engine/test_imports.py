"""The engine's core never imports its embedded lab: the lab plugs in by name, exactly as a user's task would."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = sorted((ROOT / "engine").glob("*.py"))  # every engine module outside engine/lab/


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
from atesd.engine.config import parse
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
