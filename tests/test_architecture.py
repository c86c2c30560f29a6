"""docs/ARCHITECTURE.md's import rules against the package's real import graph, both ways, so neither drifts.

The page's ```text block under "## Imports" lists, per unit (a top-level module or package of dist_moe, or
kernels/), the units it imports, which model files reach kernels, and which files import deepspeed. Every
import statement counts, also those inside functions.
"""

import ast
import functools
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "ARCHITECTURE.md"
KERNELS_MAY_IMPORT = {"torch", "triton"}


def rules() -> tuple[dict[str, set[str]], set[str], set[str]]:
    """(unit -> units it imports, model files that import kernels, files that import deepspeed) from the page."""
    block = re.search(r"## Imports\n.*?```text\n(.*?)```", PAGE.read_text(), re.S).group(1)
    allowed, seams, deepspeed = {}, set(), set()
    for line in block.strip().splitlines():
        if line.startswith("model reaches kernels only in:"):
            seams = set(line.split(":", 1)[1].split())
        elif line.startswith("deepspeed is imported only in:"):
            deepspeed = set(line.split(":", 1)[1].split())
        else:
            unit, imports = line.split("->")
            allowed[unit.strip()] = set(imports.split())
    return allowed, seams, deepspeed


def source_files() -> list[Path]:
    return sorted([*ROOT.glob("dist_moe/**/*.py"), *ROOT.glob("kernels/**/*.py")])


def unit_of_file(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("").parts
    return rel[0] if rel[0] == "kernels" or len(rel) == 1 else rel[1]


def unit_of_module(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "kernels" or parts[:2] == ["dist_moe", "kernels"]:
        return "kernels"
    return parts[1] if parts[0] == "dist_moe" and len(parts) > 1 else None


@functools.cache
def syntax_tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def imported_modules(path: Path) -> list[str]:
    """Absolute names of every module path imports (`from dist_moe import x` names dist_moe.x); relative
    imports stay inside the file's own package and are skipped."""
    names = []
    for node in ast.walk(syntax_tree(path)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names += ([f"dist_moe.{alias.name}" for alias in node.names] if node.module == "dist_moe"
                      else [node.module])
    return names


def package_path(path: Path) -> str:
    """dist_moe/model/attention.py -> model/attention.py, as the page names files."""
    rel = path.relative_to(ROOT)
    return str(rel.relative_to("dist_moe")) if rel.parts[0] == "dist_moe" else str(rel)


def test_the_import_graph_is_the_one_the_architecture_page_draws():
    allowed, _, _ = rules()
    actual = {unit: set() for unit in allowed}
    stray = []
    for path in source_files():
        unit = unit_of_file(path)
        if unit == "__init__":
            continue
        assert unit in allowed, f"{path.relative_to(ROOT)}: unit '{unit}' is missing from {PAGE.name}'s import rules"
        for module in imported_modules(path):
            target = unit_of_module(module)
            if target is not None and target != unit:
                actual[unit].add(target)
                if target not in allowed[unit]:
                    stray.append(f"{package_path(path)} imports {module} ({unit} -> {target})")
    assert not stray, f"imports {PAGE.name} does not allow:\n" + "\n".join(stray)
    unused = [f"{unit} -> {target}" for unit in allowed for target in sorted(allowed[unit] - actual[unit])]
    assert not unused, f"{PAGE.name} draws arrows the code no longer has: " + ", ".join(unused)
    assert not any("cli" in targets for targets in actual.values()), "nothing imports cli"


def test_the_model_reaches_kernels_through_its_seams_and_never_imports_deepspeed():
    _, seams, deepspeed = rules()
    reach, importers = set(), set()
    for path in source_files():
        modules = imported_modules(path)
        if unit_of_file(path) == "model" and any(unit_of_module(m) == "kernels" for m in modules):
            reach.add(package_path(path))
        if any(m.split(".")[0] == "deepspeed" for m in modules):
            importers.add(package_path(path))
    assert reach == seams, f"model files that import kernels: {sorted(reach)}; the page says {sorted(seams)}"
    assert importers == deepspeed, f"files that import deepspeed: {sorted(importers)}; the page says {sorted(deepspeed)}"
    assert not any(f.startswith("model/") for f in importers)


def test_kernels_import_only_torch_triton_and_the_standard_library():
    wrong = [f"{package_path(path)}: {module}" for path in ROOT.glob("kernels/**/*.py")
             for module in imported_modules(path)
             if module.split(".")[0] not in KERNELS_MAY_IMPORT | set(sys.stdlib_module_names)]
    assert not wrong, wrong


def test_no_module_imports_another_modules_private_names():
    wrong = []
    for path in source_files():
        for node in ast.walk(syntax_tree(path)):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and unit_of_module(node.module or ""):
                wrong += [f"{package_path(path)}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not wrong, wrong


def module_of_file(path: Path) -> str:
    """dist_moe/train/loop.py -> dist_moe.train.loop; kernels/moba.py -> dist_moe.kernels.moba."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":
        parts = ["dist_moe", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def file_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (every import statement, relative ones resolved)."""
    modules = {module_of_file(path): path for path in source_files()}
    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(syntax_tree(path)):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
                base = "dist_moe." + base if base.startswith("kernels") else base
                names = [f"{base}.{alias.name}" for alias in node.names] + [base]
            targets |= {name for name in names if name in modules and name != module}
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        unit = unit_of_module(module) or module
        units.setdefault(unit, set()).update(unit_of_module(t) or t for t in targets)
    return {unit: targets - {unit} for unit, targets in units.items()}


def test_no_import_circles_between_files_or_units():
    graph = file_graph()
    assert len(graph) > 50 and "dist_moe.model.transformer" in graph["dist_moe.train.loop"], "it must see the package"
    assert not cycles(graph), f"files that import each other in a circle: {cycles(graph)}"
    assert not cycles(unit_graph(graph)), f"units that import each other in a circle: {cycles(unit_graph(graph))}"


def test_the_circle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_function_in_the_package_is_longer_than_60_lines():
    long = [f"{package_path(path)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in source_files() for node in ast.walk(syntax_tree(path))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 >= 60]
    assert not long, long
