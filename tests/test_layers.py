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
