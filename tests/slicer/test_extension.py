"""The extension's files, checked without building them: every file the CMake files
name exists, the .ui has every widget the widget code uses, the lib stays GUI-free.

Slicer's build (slicerMacroBuildScriptedModule) installs only the files the CMake
lists name, so a Python file missing from MODULE_PYTHON_SCRIPTS works in a source
checkout and fails in the installed extension: these tests catch that here.
"""

from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "SlicerMedClass"
LIB = MODULE / "SlicerMedClassLib"


# --------------------------------------------------------------------------- a small CMake reader


def cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """``(command, arguments)`` in file order; quoted arguments keep their spaces, comments dropped."""
    text = path.read_text()
    commands, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            i = text.find("\n", i)
            i = n if i < 0 else i
            continue
        m = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(").match(text, i)
        if not m:
            i += 1
            continue
        name, i = m.group(1).lower(), m.end()
        args, cur, depth, quoted = [], "", 0, False
        while i < n:
            c = text[i]
            if quoted:
                if c == "\\" and i + 1 < n:
                    cur += text[i + 1]
                    i += 2
                    continue
                if c == '"':
                    quoted = False
                    args.append(cur)
                    cur = ""
                else:
                    cur += c
            elif c == '"':
                quoted = True
            elif c == "#":
                i = text.find("\n", i)
                continue
            elif c == "(":
                depth += 1
                cur += c
            elif c == ")":
                if depth == 0:
                    break
                depth -= 1
                cur += c
            elif c.isspace():
                if cur:
                    args.append(cur)
                    cur = ""
            else:
                cur += c
            i += 1
        if cur:
            args.append(cur)
        commands.append((name, args))
        i += 1
    return commands


def expand(value: str, variables: dict[str, list[str]]) -> str:
    for _ in range(10):
        new = re.sub(r"\$\{(\w+)\}", lambda m: " ".join(variables.get(m.group(1), [m.group(0)])), value)
        if new == value:
            break
        value = new
    return value


def cmake_variables(commands) -> dict[str, list[str]]:
    variables: dict[str, list[str]] = {}
    for name, args in commands:
        if name == "set" and args:
            variables[args[0]] = [expand(a, variables) for a in args[1:]]
    return variables


def calls(commands, name: str) -> list[list[str]]:
    return [args for cmd, args in commands if cmd == name]


@pytest.fixture(scope="module")
def root_cmake():
    commands = cmake_commands(ROOT / "CMakeLists.txt")
    return commands, cmake_variables(commands)


@pytest.fixture(scope="module")
def module_cmake():
    commands = cmake_commands(MODULE / "CMakeLists.txt")
    return commands, cmake_variables(commands)


# --------------------------------------------------------------------------- root CMakeLists.txt


def test_root_is_a_slicer_extension(root_cmake):
    commands, variables = root_cmake
    assert calls(commands, "cmake_minimum_required")
    assert calls(commands, "project") == [["SlicerMedClass"]]
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        value = " ".join(variables.get(f"EXTENSION_{key}", [])).strip()
        assert value, f"EXTENSION_{key} is not set"
    assert "PyTorch" in " ".join(variables["EXTENSION_DEPENDS"]).split()
    assert ["Slicer", "REQUIRED"] in calls(commands, "find_package")
    includes = [a[0] for a in calls(commands, "include")]
    assert "${Slicer_USE_FILE}" in includes and "${Slicer_EXTENSION_CPACK}" in includes
    # Slicer must be found before the modules are added, and packaging comes last.
    order = [c for c, a in commands if c in ("find_package", "add_subdirectory")]
    assert order.index("find_package") < order.index("add_subdirectory")
    assert commands[-1] == ("include", ["${Slicer_EXTENSION_CPACK}"])


def test_every_subdirectory_the_root_adds_exists(root_cmake):
    commands, _ = root_cmake
    subdirs = [a[0] for a in calls(commands, "add_subdirectory")]
    assert subdirs == ["SlicerMedClass"]
    for sub in subdirs:
        assert (ROOT / sub / "CMakeLists.txt").is_file()


def test_icon_and_screenshot_urls_name_files_of_this_repository(root_cmake):
    _, variables = root_cmake
    raw = variables["SLICERMEDCLASS_RAW"][0]
    urls = variables["EXTENSION_ICONURL"] + " ".join(variables["EXTENSION_SCREENSHOTURLS"]).split()
    assert urls
    for url in urls:
        assert url.startswith(raw + "/"), url
        assert (ROOT / url[len(raw) + 1:]).is_file(), f"{url} names a file that is not in the repository"


# --------------------------------------------------------------------------- SlicerMedClass/CMakeLists.txt


def test_module_builds_as_a_scripted_module_with_every_file_it_names(module_cmake):
    commands, variables = module_cmake
    assert variables["MODULE_NAME"] == ["SlicerMedClass"]
    (build,) = calls(commands, "slicermacrobuildscriptedmodule")
    assert build[:2] == ["NAME", "${MODULE_NAME}"]
    assert "${MODULE_PYTHON_SCRIPTS}" in build and "${MODULE_PYTHON_RESOURCES}" in build
    scripts = variables["MODULE_PYTHON_SCRIPTS"]
    resources = variables["MODULE_PYTHON_RESOURCES"]
    for rel in scripts + resources:
        assert (MODULE / rel).is_file(), f"SlicerMedClass/CMakeLists.txt names {rel}, which does not exist"
    assert "SlicerMedClass.py" in scripts
    assert {"Resources/Icons/SlicerMedClass.png", "Resources/UI/SlicerMedClass.ui"} <= set(resources)


def test_every_lib_file_is_installed(module_cmake):
    _, variables = module_cmake
    on_disk = {f"SlicerMedClassLib/{p.name}" for p in LIB.glob("*.py")}
    listed = {s for s in variables["MODULE_PYTHON_SCRIPTS"] if s.startswith("SlicerMedClassLib/")}
    assert on_disk == listed, f"not installed: {sorted(on_disk - listed)}; listed but missing: {sorted(listed - on_disk)}"


def test_self_test_and_testing_folder_are_registered(module_cmake):
    commands, _ = module_cmake
    names = [c for c, _ in commands]
    assert ["BUILD_TESTING"] in calls(commands, "if")
    body = names[names.index("if"):names.index("endif")]
    assert "slicer_add_python_unittest" in body and "add_subdirectory" in body
    assert ["SCRIPT", "${MODULE_NAME}.py"] in calls(commands, "slicer_add_python_unittest")
    assert ["Testing"] in calls(commands, "add_subdirectory")
    testing = cmake_commands(MODULE / "Testing" / "CMakeLists.txt")
    for (sub,) in calls(testing, "add_subdirectory"):
        assert (MODULE / "Testing" / sub / "CMakeLists.txt").is_file()
    assert (MODULE / "Testing" / "Python" / "README.md").is_file()


def test_icon_is_a_real_png():
    from PIL import Image

    with Image.open(MODULE / "Resources" / "Icons" / "SlicerMedClass.png") as im:
        assert im.format == "PNG" and im.size[0] == im.size[1] >= 64
        assert len(set(im.convert("RGB").getdata())) > 50  # a picture, not a flat placeholder


# --------------------------------------------------------------------------- the module file and its .ui


def module_tree() -> ast.Module:
    return ast.parse((MODULE / "SlicerMedClass.py").read_text())


def test_module_file_defines_module_widget_logic_and_test():
    bases = {node.name: [ast.unparse(b) for b in node.bases] for node in module_tree().body
             if isinstance(node, ast.ClassDef)}
    assert bases["SlicerMedClass"] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in bases["SlicerMedClassWidget"]
    assert bases["SlicerMedClassLogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["SlicerMedClassTest"] == ["ScriptedLoadableModuleTest"]


def test_ui_file_has_every_widget_the_widget_code_uses():
    tree = ET.parse(MODULE / "Resources" / "UI" / "SlicerMedClass.ui")
    root = tree.getroot()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "SlicerMedClass"
    names = {w.get("name") for w in root.iter("widget")} | {w.get("name") for w in root.iter("layout")}
    used = {node.attr for node in ast.walk(module_tree())
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert used, "the widget uses no .ui widget?"
    assert used <= names, f"used by SlicerMedClass.py but missing from the .ui: {sorted(used - names)}"
    # Every custom (CTK / MRML) class the .ui uses is declared, or Qt Designer cannot load it.
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    classes = {w.get("class") for w in root.iter("widget")}
    assert {c for c in classes if c.startswith(("ctk", "qMRML"))} <= declared


def test_module_resources_paths_used_in_code_exist():
    text = (MODULE / "SlicerMedClass.py").read_text()
    for rel in re.findall(r'resourcePath\("([^"]+)"\)', text):
        assert (MODULE / "Resources" / rel).is_file(), rel


# --------------------------------------------------------------------------- the lib stays GUI-free


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("path", sorted(LIB.glob("*.py")), ids=lambda p: p.name)
def test_lib_imports_no_qt_and_no_scripted_module_base(path):
    roots = {m.split(".")[0] for m in imported_modules(path)}
    assert not roots & {"qt", "ctk", "PythonQt", "PyQt5", "PySide2"}, path.name
    assert "slicer.ScriptedLoadableModule" not in imported_modules(path)
    assert roots <= set(sys.stdlib_module_names) | {"numpy", "slicer", "vtk", "medclass", "pydicom",
                                                   "SlicerMedClassLib"}, path.name


@pytest.mark.parametrize("name", ["client.py", "results.py", "dependencies.py"])
def test_what_the_widget_needs_before_installation_is_standard_library_only(name):
    roots = {m.split(".")[0] for m in imported_modules(LIB / name)}
    assert roots <= set(sys.stdlib_module_names) | {"SlicerMedClassLib"}, roots

