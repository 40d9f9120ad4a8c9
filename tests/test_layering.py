"""The layers point one way (flows → tasks → kdrl), `import kdrl` stays light, test modules share
helpers only through conftest.py, and nothing in the repository points outside it."""

import ast
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_import_kdrl_is_light():
    """What makes `import kdrl` fast is what it does not import; that is checked here, not seconds
    (a timed unit test fails on a busy shared box: seconds belong in benchmarks)."""
    code = (
        "import sys; import kdrl, kdrl.config, kdrl.losses, kdrl.advantages; "
        "print(repr(sorted(m for m in ('vllm', 'prefect', 'transformers', 'polars') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert eval(out.stdout.strip()) == []
    # `import kdrl` alone: must not pull torch either.
    bare = subprocess.run([sys.executable, "-c", "import sys; import kdrl; print('torch' in sys.modules)"],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    assert bare.stdout.strip() == "False"


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


def _tracked_files(*patterns: str) -> list[Path]:
    """Files git tracks under ROOT that match ``patterns`` (what a clone gets)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", *patterns], capture_output=True, text=True, check=True,
                             cwd=ROOT)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    return [ROOT / name for name in out.stdout.split("\0") if name]


def test_nothing_refers_to_the_shared_folder_beside_the_checkout():
    """The project's notes once lived in a folder next to the repository, which no clone has;
    what readers need from them is in docs/ (paper.md, style.md)."""
    outside = re.compile(r"(\.\./|/work/)shared/")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in _tracked_files("*.md", "*.py", "*.yaml", "*.toml", "*.sh", "*.txt", "*.cfg")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if outside.search(line)
    ]
    assert offenders == []


def test_relative_markdown_links_point_to_files_in_the_repository():
    """``[text](target)`` in a tracked .md: a relative target (anchor dropped) is a file or folder
    of this repository, resolved from the linking file's folder as a reader's browser does. Code
    blocks and spans are not links."""
    code = re.compile(r"^```.*?^```|`[^`\n]*`", re.MULTILINE | re.DOTALL)
    link = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
    dead = []
    for path in _tracked_files("*.md"):
        for target in link.findall(code.sub("", path.read_text())):
            if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL (https:, mailto:) or an anchor in the same page
            resolved = (path.parent / target.split("#")[0]).resolve()
            if not (resolved.is_relative_to(ROOT) and resolved.exists()):
                dead.append(f"{path.relative_to(ROOT)}: {target}")
    assert dead == []


def _ruff() -> list[str]:
    """The command that runs ruff: this interpreter's ruff package (the dev extra), else one on PATH."""
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    if found := shutil.which("ruff"):
        return [found]
    pytest.skip("ruff is not installed (pip install -e '.[dev]')")


def test_lines_fit_the_configured_length():
    """ruff's E501 at pyproject's line-length, over what ruff checks (Python files, not markdown):
    a reader's editor and a side-by-side diff show every line whole. --no-cache: the test writes
    nothing into the checkout."""
    done = subprocess.run([*_ruff(), "check", "--select", "E501", "--no-cache", "--output-format", "json", "."],
                          capture_output=True, text=True, check=False, cwd=ROOT)
    assert done.returncode in (0, 1), done.stderr  # 1: violations found; 2: ruff itself failed
    offenders = [f"{Path(v['filename']).resolve().relative_to(ROOT)}:{v['location']['row']}: {v['message']}"
                 for v in json.loads(done.stdout)]
    assert not offenders, f"{len(offenders)} lines over pyproject's line-length:\n" + "\n".join(offenders)
