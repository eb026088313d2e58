"""The package layout: dvc.yaml's deps cover every module a stage runs, and the imports between packages stay clean."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
ENTRY_POINTS = ("download", "split", "train", "evaluate", "tune", "predict", "bench", "faithfulness")
CORE = "src.learn"
NOT_IN_CORE = ("mlflow", "optuna", "argparse")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def resolve(name: str) -> str | None:
    """The src module that `import name` or `from name import x` loads (a package loads its __init__)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


@cache
def imports(module: str) -> tuple[frozenset[str], frozenset[str]]:
    """(src modules, top-level third-party or stdlib names) that `module` imports anywhere in its body."""
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from src.tracking import runs` imports the module src.tracking.runs
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "src" or name.startswith("src."):
                found = resolve(name)
                if found and found != "src":
                    ours.add(found)
                    ours.update(parent for parent in _parents(found) if parent in MODULES)
            else:
                theirs.add(name.partition(".")[0])
    ours.discard(module)
    return frozenset(ours), frozenset(theirs)


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(2, len(parts))]


def closure(module: str) -> set[str]:
    """`module` and every src module it imports, transitively."""
    seen, todo = {module}, [module]
    while todo:
        for dep in imports(todo.pop())[0]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_stage_names_an_entry_point():
    for name, stage in stages().items():
        assert stage["cmd"].startswith(f"python -m src.{name}"), (name, stage["cmd"])
        assert f"src.{name}" in MODULES


@pytest.mark.parametrize("stage", list(stages()))
def test_stage_deps_cover_every_module_it_imports(stage):
    deps = [Path(d) for d in stages()[stage]["deps"] if not str(d).startswith("$")]
    for dep in deps:
        assert (REPO / dep).exists(), f"dvc.yaml stage {stage}: dep {dep} does not exist"
    uncovered = [
        module
        for module in sorted(closure(f"src.{stage}"))
        if not any(MODULES[module].relative_to(REPO).is_relative_to(dep) for dep in deps)
    ]
    assert not uncovered, f"dvc.yaml stage {stage}: deps miss {uncovered}; add their package folder"


def test_no_library_module_imports_an_entry_point():
    entries = {f"src.{name}" for name in ENTRY_POINTS}
    offenders = {m: sorted(imports(m)[0] & entries) for m in MODULES if m not in entries and imports(m)[0] & entries}
    assert not offenders


def test_entry_points_are_thin():
    for name in ENTRY_POINTS:
        tree = ast.parse(MODULES[f"src.{name}"].read_text())
        functions = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert "main" in functions, name
        assert len(functions) <= 3, f"src/{name}.py defines {functions}; the work belongs in a package"


def test_the_core_imports_no_tracker_tuner_or_cli_and_reads_no_params_file():
    for module in sorted(m for m in MODULES if m == CORE or m.startswith(f"{CORE}.")):
        reached = closure(module)
        third_party = set().union(*(imports(m)[1] for m in reached))
        assert not third_party & set(NOT_IN_CORE), (module, sorted(third_party & set(NOT_IN_CORE)))
        assert not any(
            m in ("src.cli", "src.tracking", "src.tuning") or m.startswith(("src.tracking.", "src.tuning."))
            for m in reached
        ), (module, sorted(reached))
        source = MODULES[module].read_text()
        assert "load_params" not in source and "params.yaml" not in source, module


def test_no_import_cycles_between_modules_or_packages():
    def package(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2]) if len(parts) > 2 else module

    for module in MODULES:
        for dep in imports(module)[0]:
            assert module not in closure(dep) or module.startswith(dep + "."), f"cycle: {module} <-> {dep}"
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        graph.setdefault(package(module), set()).update(
            package(d) for d in imports(module)[0] if package(d) != package(module)
        )

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and not seen.add(n) and reaches(n, goal, seen)) for n in graph[start])

    cycles = [p for p in graph if reaches(p, p, set())]
    assert not cycles, f"packages that import each other: {cycles}"
