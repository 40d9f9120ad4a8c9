"""The layers point one way (flows → tasks → kdrl) and `import kdrl` stays light."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_kdrl_never_imports_prefect_flows_or_tasks():
    offenders = {
        path: sorted(names & {"prefect", "flows", "tasks"})
        for path, names in _imported_modules("kdrl").items()
        if names & {"prefect", "flows", "tasks"}
    }
    assert offenders == {}


def test_flows_touch_no_tensors():
    offenders = {p: n & {"torch", "polars"} for p, n in _imported_modules("flows").items() if n & {"torch", "polars"}}
    assert offenders == {}


def test_import_kdrl_is_light_and_fast():
    code = (
        "import sys, time; t = time.perf_counter(); import kdrl, kdrl.config, kdrl.losses, kdrl.advantages; "
        "dt = time.perf_counter() - t; "
        "heavy = sorted(m for m in ('vllm', 'prefect', 'transformers') if m in sys.modules); "
        "print(repr((dt, heavy)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    seconds, heavy = eval(out.stdout.strip())
    assert heavy == []
    # `import kdrl` alone: must not pull torch either.
    bare = subprocess.run(
        [sys.executable, "-c", "import sys, time; t = time.perf_counter(); import kdrl; "
         "print(repr((time.perf_counter() - t, 'torch' in sys.modules)))"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    bare_seconds, torch_loaded = eval(bare.stdout.strip())
    assert not torch_loaded and bare_seconds < 1.0
    assert seconds < 5.0  # generous: the math modules import torch (~1 s cold on 2 cores)


def test_test_modules_share_helpers_through_conftest_not_imports():
    """A test module that imports another one runs that module's import-time code, drags its
    fixtures into its own namespace and breaks when the helper's home is renamed; fixtures in
    conftest.py are found by name. Scripts that tests run in a subprocess count too, so the
    source is read as text, not parsed."""
    tests = ROOT / "tests"
    siblings = {p.stem for p in tests.glob("*.py")}
    imports = re.compile(r"^\s*(?:from\s+(\w+)\s+import|import\s+(\w+))", re.MULTILINE)
    offenders = {
        path.name: sorted(found)
        for path in sorted(tests.glob("*.py"))
        if (found := {a or b for a, b in imports.findall(path.read_text())} & siblings)
    }
    assert offenders == {}
