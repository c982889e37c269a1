"""The rules of the house (docs/ARCHITECTURE.md), read from the imports of every module of the package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = REPO / "mednist_gan"
WINGS = ("config", "models", "runtime", "training", "quality", "generator", "sweep")

# What each part may not import: a wing is read only by the wings after it in the data flow.
FORBIDDEN = {
    "ground floor": {"models", "runtime", "training", "quality", "generator", "sweep", "cli"},
    "config": {"models", "runtime", "training", "quality", "generator", "sweep", "cli"},
    "models": {"runtime", "training", "quality", "generator", "sweep", "cli"},
    "runtime": {"training", "quality", "generator", "sweep", "cli"},
    "generator": {"runtime", "training", "quality", "sweep", "cli"},
    "quality": {"runtime", "training", "sweep", "cli"},
    "training": {"sweep", "cli"},
    "sweep": {"cli"},
}
MAX_MODULE_LINES = 450


def part(module: str) -> str:
    """``mednist_gan.training.step`` -> ``training``; ``mednist_gan.data`` -> the ground floor (``cli`` is its own)."""
    name = module.split(".")[1] if module.count(".") else ""
    if name in WINGS or name == "cli":
        return name
    return "ground floor"


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        dotted = ".".join(("mednist_gan", *path.relative_to(PACKAGE).with_suffix("").parts))
        found.append((dotted.removesuffix(".__init__"), path))
    return found


def imported(module: str, path: Path) -> set[str]:
    """Every ``mednist_gan`` module ``module`` imports, at the top or inside a function, as absolute names."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("mednist_gan"):
                names.add(target)
                names.update(f"{target}.{alias.name}" for alias in node.names)  # from . import checkpoint
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("mednist_gan"))
    return names


@pytest.mark.parametrize("module, path", modules(), ids=[m for m, _ in modules()])
def test_each_module_imports_only_what_its_part_may(module, path):
    here = part(module)
    if module in ("mednist_gan.__main__", "mednist_gan.train", "mednist_gan.cli"):
        return  # the entry points call everything
    known = {m for m, _ in modules()}
    bad = sorted(target for target in imported(module, path)
                 if target in known and part(target) in FORBIDDEN[here] and part(target) != here)
    assert not bad, f"{module} ({here}) imports {bad}: see the rules in docs/ARCHITECTURE.md"


def test_the_reader_above_sees_relative_and_lazy_imports():
    """The rule checker itself: a relative import inside a function is found and resolved."""
    sample = PACKAGE / "generator" / "loader.py"
    found = imported("mednist_gan.generator.loader", sample)
    assert "mednist_gan.config" in found and "mednist_gan.checkpoint" in found
    assert "mednist_gan.models.networks" in found  # imported inside _built_generator


@pytest.mark.parametrize("module, path", modules(), ids=[m for m, _ in modules()])
def test_no_module_is_longer_than_the_limit(module, path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{module}: {lines} lines (at most {MAX_MODULE_LINES}: split it by job)"


def test_ruff_finds_nothing():
    """The linter of pyproject.toml ([tool.ruff]) over the package, tests, benchmarks and docs' scripts."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "mednist_gan", "tests", "benchmarks",
                             "docs"], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-500:]


# ----------------------------------------------------------------------------- the tests' own house

TESTS = REPO / "tests"
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "benchmarks").glob("*.sh")),
             *sorted((REPO / "mednist_gan").rglob("*.py")), *sorted(TESTS.rglob("*.py")), REPO / ".ci" / "run"]


def marks_slow(path: Path) -> bool:
    """Whether a file names ``pytest.mark.slow`` (as a decorator, a ``pytestmark`` or anywhere else)."""
    return any(isinstance(node, ast.Attribute) and node.attr == "slow" and isinstance(node.value, ast.Attribute)
               and node.value.attr == "mark" for node in ast.walk(ast.parse(path.read_text())))


def test_the_folder_decides_the_tier():
    """tests/unit/<wing>/ mirrors the package and is the fast tier; tests/system/ (launches, clusters, kills, whole
    runs) is the slow one, marked by conftest.py from the folder alone, so no test marks itself."""
    wings = {p.name for p in (TESTS / "unit").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert wings == set(WINGS), f"tests/unit/ folders {sorted(wings)} do not mirror the wings {sorted(WINGS)}"
    marked = [p.relative_to(TESTS).as_posix() for p in sorted(TESTS.rglob("test_*.py")) if marks_slow(p)]
    assert not marked, f"{marked} mark tests slow themselves: move them to tests/system/ instead"
    assert not list(TESTS.glob("test_*.py")), "a test file belongs in tests/unit/ or tests/system/"


def test_every_test_the_docs_name_exists():
    """`<file>::<test>` in the README and docs/ names a test function of a file of that name, and every
    `tests/...py` path there, in the scripts and in the code is a file."""
    defined: dict[str, set[str]] = {}
    for path in TESTS.rglob("test_*.py"):
        tree = ast.parse(path.read_text())
        tests = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        defined.setdefault(path.name, set()).update(tests)
    missing = []
    for doc in DOCUMENTS:
        for file, name in re.findall(r"\b(test_\w+\.py)::(test_\w+)", doc.read_text()):
            if name not in defined.get(file, ()):
                missing.append(f"{doc.relative_to(REPO)}: {file}::{name}")
        for path in re.findall(r"\btests/[\w/]+\.py\b", doc.read_text()):
            if not (REPO / path).is_file():
                missing.append(f"{doc.relative_to(REPO)}: {path}")
    assert not missing, "tests named in the docs that do not exist there:\n" + "\n".join(missing)


def test_the_user_path_stays_short():
    """The README and the quality guide are read first: at most 10 KB and 12 KB (run history lives in
    docs/experiments/)."""
    assert (REPO / "README.md").stat().st_size <= 10 * 1024
    assert (REPO / "docs" / "quality.md").stat().st_size <= 12 * 1024


def test_every_fixture_a_test_asks_for_is_where_it_runs():
    """A test's arguments are pytest's own fixtures, conftest.py's, its file's, or its parameters: found here
    rather than as setup errors at the end of a slow tier (a test moved between tiers leaves its fixtures behind)."""
    builtin = {"tmp_path", "tmp_path_factory", "monkeypatch", "capsys", "capfd", "caplog", "recwarn", "request"}
    shared = {node.name for node in ast.parse((TESTS / "conftest.py").read_text()).body
              if isinstance(node, ast.FunctionDef)}
    missing = []
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
        local = {f.name for f in functions if any("fixture" in ast.unparse(d) for d in f.decorator_list)}
        for function in functions:
            if not (function.name.startswith("test_") or function.name in local):
                continue
            parameters = {name.strip() for d in function.decorator_list if "parametrize" in ast.unparse(d)
                          and isinstance(d.args[0], ast.Constant) for name in d.args[0].value.split(",")}
            asked = {a.arg for a in function.args.args} - builtin - shared - local - parameters
            missing += [f"{path.relative_to(TESTS)}::{function.name} asks for {name}" for name in sorted(asked)]
    assert not missing, "\n".join(missing)
