"""The layout the project promises: the core never imports a front door, and no
module imports itself back through others (imports inside functions count too:
hiding a cycle in a function does not remove it). The front doors' own modules are
checked for cycles as well, under the names they are imported by (the MONAI Label
app's ``lib``, the Slicer module's ``SlicerMedClassLib``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: (folder on sys.path, package or module in it): everything whose imports are checked.
PACKAGES = (
    (ROOT, "medclass"),
    (ROOT, "dicom_node"),
    (ROOT / "monailabel_app", "lib"),  # MONAI Label puts the app folder on sys.path
    (ROOT / "monailabel_app", "main.py"),
    (ROOT / "SlicerMedClass", "SlicerMedClassLib"),  # Slicer puts the module folder on sys.path
    (ROOT / "SlicerMedClass", "SlicerMedClass.py"),
)
FRONT_DOORS = ("dicom_node", "monailabel_app", "SlicerMedClass", "SlicerMedClassLib", "lib", "main")


def _modules() -> dict[str, Path]:
    mods = {}
    for base, pkg in PACKAGES:
        paths = [base / pkg] if pkg.endswith(".py") else sorted((base / pkg).rglob("*.py"))
        for path in paths:
            parts = path.relative_to(base).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = path
    return mods


def _imported(node: ast.AST, module: str, path: Path) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        return [f"{base}.{a.name}" for a in node.names]
    return []


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> project modules it imports; and every core -> front door import."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    to_front: list[str] = []
    for module, path in mods.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            for name in _imported(node, module, path):
                if module.startswith("medclass") and name.split(".")[0] in FRONT_DOORS:
                    to_front.append(f"{module} imports {name}")
                while name and name not in mods:  # "pkg.mod.attr" -> "pkg.mod"
                    name = name.rpartition(".")[0]
                if name and name != module:
                    edges.add(name)
        graph[module] = edges
    return graph, to_front


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_core_never_imports_a_front_door():
    _, to_front = import_graph()
    assert not to_front, "medclass must not import a front door (use an entry point):\n" + "\n".join(to_front)


def test_no_import_cycles():
    graph, _ = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_every_front_door():
    mods = _modules()
    for name in ("medclass.cli", "dicom_node.jobs", "lib.configs.classification", "main",
                 "SlicerMedClassLib.logic", "SlicerMedClass"):
        assert name in mods, name
    graph, _ = import_graph()
    assert "lib.configs.classification" in graph["lib.trainers.classify"]
    assert "SlicerMedClassLib.results" in graph["SlicerMedClassLib.logic"]


def test_the_checker_sees_a_cycle_and_a_front_door_import():
    # The checker itself must be able to fail.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from dicom_node.cli import main\n")
    names = [n for node in ast.walk(tree) for n in _imported(node, "medclass.cli", ROOT / "medclass" / "cli.py")]
    assert names == ["dicom_node.cli.main"]
