"""How infra/ is layered (issue 17, item 10): the command line (infra/cli.py) sits on top of the stages
(infra/tpu.py) and the babysitter (infra/babysit.py), which the babysitter drives; no module of infra/
imports one that imports it back. Read from the sources with `ast`, so nothing is imported here."""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"


def infra_imports(path: Path) -> set[str]:
    """The infra modules a source file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "infra":
            found |= {f"infra.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("infra."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("infra.")}
    return {name for name in found if (INFRA / f"{name.removeprefix('infra.')}.py").exists()}


def graph() -> dict[str, set[str]]:
    return {f"infra.{path.stem}": infra_imports(path) for path in sorted(INFRA.glob("*.py"))
            if path.stem != "__init__"}


def reaches(edges: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), list(edges.get(start, ()))
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(edges.get(name, ()))
    return seen


def test_the_stages_and_the_babysitter_do_not_import_each_other():
    edges = graph()
    assert "infra.tpu" in edges["infra.babysit"]  # the babysitter drives the stages...
    assert "infra.babysit" not in reaches(edges, "infra.tpu")  # ...which never call it back


def test_no_module_of_infra_imports_itself_back():
    edges = graph()
    assert [name for name in edges if name in reaches(edges, name)] == []


def test_the_command_line_sits_on_top_of_both():
    edges = graph()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module = scripts["sophia-tpu"].split(":")[0]
    assert {"infra.tpu", "infra.babysit"} <= edges.get(module, set())
    assert all(module not in reaches(edges, name) for name in edges if name != module)
