"""The README documents every registered method (its table is generated from the registry)."""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_readme_method_table_matches_the_registry():
    from method_table import method_table
    assert method_table() in (ROOT / "README.md").read_text(), "run scripts/method_table.py and update README"


def test_readme_test_command_is_what_ci_runs():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()
