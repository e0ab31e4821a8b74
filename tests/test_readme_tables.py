"""The README's performance tables are generated from benchmarks/results/*.json and kept in sync."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_performance_tables_match_the_results_files():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def test_check_fails_on_a_stale_readme(tmp_path):
    stale = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text().replace("| omniglot 5w1s q15 T=32 |", "| omniglot 5w1s q15 T=32 (edited) |")
    stale.write_text(text)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), "--check", "--readme", str(stale)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "out of date" in r.stderr
