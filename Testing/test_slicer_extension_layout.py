"""The Slicer extension's files agree with each other, checked without Slicer or CMake.

A Python file or resource missing from CMakeLists.txt, or a widget name the panel code uses but
the .ui lacks, gives a broken extension that no local run notices; these tests read the files
as text and XML and compare.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_NAME = "RegistrationMisalignment"
MODULE_DIR = REPO / MODULE_NAME
MODULE_FILE = MODULE_DIR / f"{MODULE_NAME}.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / f"{MODULE_NAME}.ui"
LIB_DIR = REPO / "RegistrationMisalignmentLib"
SLICER_LIB = "RegistrationMisalignmentSlicerLib"


def cmake_text(path: Path) -> str:
    """CMake source without comments (a # outside quotes), ${MODULE_NAME} expanded."""
    lines = [re.match(r'((?:[^"#]|"[^"]*")*)', line).group(1) for line in path.read_text(encoding="utf-8").splitlines()]
    return "\n".join(lines).replace("${MODULE_NAME}", MODULE_NAME)


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert match, f"set({variable} ...) not found"
    return match.group(1).split()


def files_under(folder: Path, pattern: str) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob(pattern)
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def module_cmake() -> str:
    return cmake_text(MODULE_DIR / "CMakeLists.txt")


# ---- CMake listing -----------------------------------------------------------------------
def test_every_module_script_is_listed_and_exists(module_cmake):
    listed = cmake_list(module_cmake, "MODULE_PYTHON_SCRIPTS")
    assert sorted(set(listed)) == sorted(listed), "listed twice"
    assert set(listed) == files_under(MODULE_DIR, "*.py")
    assert f"{MODULE_NAME}.py" in listed


def test_python_files_beside_the_module_script_are_modules():
    # Slicer loads every .py directly in the module folder as a module: helpers go in a package.
    assert [p.name for p in MODULE_DIR.glob("*.py")] == [f"{MODULE_NAME}.py"]
    assert (MODULE_DIR / SLICER_LIB / "__init__.py").is_file()


def test_every_resource_is_listed_and_exists(module_cmake):
    listed = cmake_list(module_cmake, "MODULE_PYTHON_RESOURCES")
    assert set(listed) == {f"Resources/{p}" for p in files_under(MODULE_DIR / "Resources", "*")}
    assert {f"Resources/Icons/{MODULE_NAME}.png", f"Resources/UI/{MODULE_NAME}.ui"} <= set(listed)


def test_every_lib_file_is_listed_relative_to_the_repository_top(module_cmake):
    listed = cmake_list(module_cmake, "LIB_PYTHON_SCRIPTS")
    assert sorted(set(listed)) == sorted(listed), "listed twice"
    assert set(listed) == {f"RegistrationMisalignmentLib/{p}" for p in files_under(LIB_DIR, "*.py")}
    # ...and copied from the repository top into the module's own folder.
    call = re.search(r"ctkMacroCompilePythonScript\((.*?)\)\n", module_cmake, re.S).group(1)
    assert '"${LIB_PYTHON_SCRIPTS}"' in call
    assert re.search(r"SOURCE_DIR\s+\$\{CMAKE_CURRENT_SOURCE_DIR\}/\.\.\s", call)
    assert "DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}" in call


def test_model_glob_covers_every_shipped_model_file(module_cmake):
    patterns = re.findall(r"\$\{CMAKE_CURRENT_SOURCE_DIR\}/\.\./(Resources/Models/\S+)", module_cmake)
    assert patterns
    models = REPO / "Resources" / "Models"
    shipped = [f"Resources/Models/{p}" for p in files_under(models, "*")
               if not Path(p).name.startswith(".")] if models.is_dir() else []
    uncovered = [f for f in shipped if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    assert not uncovered
    assert re.search(r'RESOURCES\s+"\$\{LIB_MODEL_FILES\}"', module_cmake)


def test_module_is_built_with_generic_tests_and_registers_its_test(module_cmake):
    build = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", module_cmake, re.S).group(1)
    assert re.search(r"NAME\s+RegistrationMisalignment\b", build)
    assert "SCRIPTS ${MODULE_PYTHON_SCRIPTS}" in build and "RESOURCES ${MODULE_PYTHON_RESOURCES}" in build
    assert "WITH_GENERIC_TESTS" in build
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+RegistrationMisalignment\.py\s*\)", module_cmake)


def test_top_level_cmake_has_extension_metadata_and_slicer_boilerplate():
    text = cmake_text(REPO / "CMakeLists.txt")
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf'set\({variable}\s+"[^"]+"\)', text), variable
    assert re.search(r'set\(EXTENSION_CATEGORY\s+"Registration"\)', text)
    order = ["project(RegistrationMisalignment)", "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
             "add_subdirectory(RegistrationMisalignment)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
             "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.find(line) for line in order]
    assert -1 not in positions and positions == sorted(positions)


# ---- .ui against the widget code -------------------------------------------------------
@pytest.fixture(scope="module")
def ui_tree() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def widget_names(root: ET.Element) -> set[str]:
    return {w.get("name") for w in root.iter("widget")}


def test_every_widget_the_code_uses_exists_in_the_ui(ui_tree):
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used, "the widget code uses no self.ui names"
    assert used - widget_names(ui_tree) == set()


def parameter_fields() -> set[str]:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == f"{MODULE_NAME}ParameterNode")
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


def test_every_parameter_binding_in_the_ui_names_a_parameter(ui_tree):
    bound = [p.find("string").text for p in ui_tree.iter("property") if p.get("name") == "SlicerParameterName"]
    assert bound and set(bound) <= parameter_fields()
    assert len(bound) == len(set(bound))


def test_every_node_selector_receives_the_scene(ui_tree):
    selectors = {w.get("name") for w in ui_tree.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = {c.findtext("receiver") for c in ui_tree.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("sender") == MODULE_NAME and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert selectors and selectors == connected


def test_custom_widget_classes_are_declared(ui_tree):
    used = {w.get("class") for w in ui_tree.iter("widget")}
    declared = {c.findtext("class") for c in ui_tree.iter("customwidget")}
    assert {c for c in used if not c.startswith("Q")} == declared


# ---- other resources and imports -----------------------------------------------------------
def test_icon_is_a_128_pixel_png():
    data = (MODULE_DIR / "Resources" / "Icons" / f"{MODULE_NAME}.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


def top_level_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` is imported (not those imported inside functions)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_module_imports_existing_helpers_and_no_torch_at_load():
    files = [MODULE_FILE, *(MODULE_DIR / SLICER_LIB).glob("*.py")]
    for path in files:
        for name in top_level_imports(path):
            if name.startswith(SLICER_LIB + "."):
                assert (MODULE_DIR / (name.replace(".", "/") + ".py")).is_file(), (path.name, name)
            assert name.split(".")[0] != "torch", f"{path.name} imports torch at load"


def test_the_lib_imports_nothing_above_it():
    """The Lib is the floor: no module of it imports slicer, qt, vtk or the trainer (read from the code's AST)."""
    import ast

    forbidden = {"slicer", "qt", "vtk", "trainer", "benchmarks"}
    offenders = []
    for path in LIB_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert offenders == []


def test_every_text_file_is_opened_with_its_encoding():
    """Inside Slicer (and after any import of VTK) the C locale makes Python's default text encoding ASCII,
    so every read_text / write_text / text-mode open, and every subprocess read as text, of our code and
    tests names UTF-8 (read from the AST)."""
    import ast

    offenders = []
    for folder in ("RegistrationMisalignmentLib", "RegistrationMisalignment", "trainer", "benchmarks", "Testing"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Call):
                    continue
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                text_mode = any(k.arg in ("text", "universal_newlines") for k in node.keywords)
                if any(k.arg == "encoding" for k in node.keywords):
                    continue
                if name in ("run", "Popen", "check_output") and text_mode:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {name}(text=True)")
                    continue
                if name not in ("read_text", "write_text", "open"):
                    continue
                modes = [a.value for a in node.args[1:2] + [k.value for k in node.keywords if k.arg == "mode"]
                         if isinstance(a, ast.Constant)]
                if name == "open" and (not node.args or any("b" in str(m) for m in modes)):
                    continue  # binary, or not a file open (e.g. Image.open without arguments)
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    assert offenders == []
