"""The folders are the architecture: pages -> dashboard -> training -> core, no import upward (checked on the
source, every import statement, function-level ones included), and pages reach the library only through
dashboard (Streamlit pages stay thin)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOORS = ["core", "training", "dashboard", "pages"]  # lowest first


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out & set(FLOORS)


@pytest.mark.parametrize("floor", FLOORS)
def test_no_import_upward(floor):
    allowed = set(FLOORS[:FLOORS.index(floor) + 1])
    if floor == "pages":
        allowed = {"dashboard", "pages"}  # the library only through dashboard/services
    files = sorted((ROOT / floor).rglob("*.py"))
    assert files
    bad = {str(p.relative_to(ROOT)): sorted(imported_packages(p) - allowed) for p in files}
    assert not {k: v for k, v in bad.items() if v}, f"{floor} imports upward (or around dashboard)"


def test_the_checker_sees_function_level_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import os\n\ndef g():\n    from training.store import RunStore\n    import dashboard.services\n")
    assert imported_packages(f) == {"training", "dashboard"}


CORE_PARTS = ["data", "image", "nets", "decide", "smear"]  # lowest first: files, one cell's maths, Keras, calls, smears


def imported_core_parts(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods.add(node.module)
            if node.module == "core":
                mods |= {f"core.{a.name}" for a in node.names}
    return {m.split(".")[1] for m in mods if m.startswith("core.") and m.count(".") >= 1}


def test_core_is_sub_packages_with_few_top_level_modules():
    top = sorted(p.name for p in (ROOT / "core").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 3, top
    assert sorted(p.name for p in (ROOT / "core").iterdir() if (p / "__init__.py").exists()) == sorted(CORE_PARTS)


@pytest.mark.parametrize("part", CORE_PARTS)
def test_core_parts_import_one_way(part):
    allowed = set(CORE_PARTS[:CORE_PARTS.index(part) + 1])
    files = sorted((ROOT / "core" / part).rglob("*.py"))
    bad = {str(p.relative_to(ROOT)): sorted(imported_core_parts(p) - allowed) for p in files}
    assert not {k: v for k, v in bad.items() if v}, f"core/{part} imports a later part"


@pytest.mark.parametrize("part", CORE_PARTS)
def test_core_part_inits_import_nothing(part):
    """Importing a part runs nothing and pulls in no Keras (the dashboard starts without it)."""
    tree = ast.parse((ROOT / "core" / part / "__init__.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_the_part_checker_sees_upward_edges(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from core.smear.fields import CallRule\n\ndef g():\n    import core.nets.models\n    from core import decide\n")
    assert imported_core_parts(f) == {"smear", "nets", "decide"}
