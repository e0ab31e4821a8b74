"""`metalearn ablate`: grid x seeds on real Omniglot (tiny), aggregation, table, figure, re-run, bad input."""
import json
import math
from pathlib import Path

import pytest
import torch

from metalearn.cli import main

from test_checkpoint import TINY
from test_cli import QUICK, assert_one_line_error, run_cli


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def ablation_file(tmp_path):
    overrides = ", ".join([t for t in TINY if not t.startswith("outer.iterations")] + ["outer.iterations=4"])
    return _write(tmp_path / "steps_fo.yaml", f"""description: tiny test grid
base: {QUICK}
overrides: [{overrides}]
vary:
  inner.first_order: [false, true]
""")


@pytest.mark.slow
def test_ablate_runs_the_grid_and_aggregates_over_seeds(ablation_file, data_root, cache_dir, tmp_path, monkeypatch,
                                                        capsys):
    monkeypatch.setenv("METALEARN_DATA", str(data_root))
    monkeypatch.setenv("METALEARN_CACHE", str(cache_dir))
    out = tmp_path / "out"
    assert main(["ablate", str(ablation_file), "--seeds", "2", "--out", str(out), "--no-progress"]) == 0
    folder = out / "steps_fo"
    report = json.loads((folder / "results.json").read_text())
    assert report["keys"] == ["inner.first_order"] and len(report["cells"]) == 2
    assert [c["values"] for c in report["cells"]] == [{"inner.first_order": False}, {"inner.first_order": True}]
    for cell in report["cells"]:
        accs = []
        for seed, run in enumerate(cell["runs"]):
            saved = json.loads((Path(run["run_dir"]) / "eval-test.json").read_text())
            cfg = torch.load(Path(run["run_dir"]) / "checkpoint.pt", weights_only=True)["config"]
            assert cfg["seed"] == seed and cfg["inner"]["first_order"] == cell["values"]["inner.first_order"]
            assert cfg["tracking"]["wandb"]["group"] == "steps_fo"
            accs.append(saved["eval"]["mean"])
        mean = sum(accs) / 2
        sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / 1)
        assert cell["mean"] == pytest.approx(mean, abs=1e-12)
        assert cell["ci95"] == pytest.approx(12.706 * sd / math.sqrt(2), abs=1e-12)  # Student t, 1 degree of freedom
        assert cell["interval"] == "seeds (Student t, n=2)"
    # different seeds give different runs (else the CI over seeds would be meaningless)
    assert report["cells"][0]["runs"][0]["accuracy"] != report["cells"][0]["runs"][1]["accuracy"]
    table = (folder / "table.md").read_text()
    assert "| inner.first_order | accuracy (%) | interval over | seeds | per seed (%) |" in table
    c = report["cells"][1]
    assert f"| true | {100 * c['mean']:.2f} ± {100 * c['ci95']:.2f} | seeds (Student t, n=2) | 2 |" in table
    assert report["settings"]["outer.iterations"] == 4 and report["settings"]["eval.episodes"] == 5
    assert "outer.iterations=4, eval.episodes=5" in table
    assert (folder / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table in capsys.readouterr().out

    # a re-run trains nothing: every run is finished
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("*/checkpoint.pt")}
    assert len(stamps) == 4
    assert main(["ablate", str(ablation_file), "--seeds", "2", "--out", str(out)]) == 0
    assert "[1/4]" not in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in folder.glob("*/checkpoint.pt")}

    # the stale-cell case: the same command with longer training must not reuse the old cells
    results = (folder / "results.json").read_bytes()
    assert main(["ablate", str(ablation_file), "--seeds", "2", "--out", str(out), "outer.iterations=6",
                 "eval.episodes=7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outer.iterations: trained with 4, this ablation asks for 6" in err[0], err
    assert (folder / "results.json").read_bytes() == results  # the old table is not reprinted as the new one
    assert stamps == {p: p.stat().st_mtime_ns for p in folder.glob("*/checkpoint.pt")}


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("metalearn: error:") and match in err[0], err


def test_ablate_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    bad_key = _write(tmp_path / "a.yaml", f"base: {QUICK}\nvary:\n  inner.stepz: [1, 2]\n")
    _one_line_error(capsys, ["ablate", str(bad_key), "--out", str(out)], "inner.stepz")
    bad_type = _write(tmp_path / "b.yaml", f"base: {QUICK}\nvary:\n  inner.steps: [1, many]\n")
    _one_line_error(capsys, ["ablate", str(bad_type), "--out", str(out)], "inner.steps")
    empty = _write(tmp_path / "c.yaml", f"base: {QUICK}\nvary: {{}}\n")
    _one_line_error(capsys, ["ablate", str(empty), "--out", str(out)], "`vary` must map config keys")
    unknown = _write(tmp_path / "d.yaml", f"base: {QUICK}\nvary:\n  inner.steps: [1]\nseeds: 3\n")
    _one_line_error(capsys, ["ablate", str(unknown), "--out", str(out)], "unknown key 'seeds'")
    _one_line_error(capsys, ["ablate", str(tmp_path / "none.yaml")], "ablation file not found")
    _one_line_error(capsys, ["ablate", str(bad_key), "--seeds", "0"], "--seeds must be >= 1")
    assert not out.exists()
    # and through the real entry point: exit code 2, one line, no traceback
    assert_one_line_error(run_cli("ablate", str(bad_key), "--out", str(out)), "inner.stepz")


def test_two_key_table_and_figure(tmp_path):
    """The 2-D grid's table rows and figure (one line per value of the second key), from a hand-made report."""
    from metalearn.ablate import markdown_table, plot_ablation

    cells = [{"values": {"inner.steps": s, "inner.adapt": a}, "mean": m, "ci95": 0.01, "seeds": 3,
              "runs": [{"accuracy": m}] * 3}
             for (s, a), m in zip([(1, ["*"]), (1, ["head.*"]), (3, ["*"]), (3, ["head.*"])], [0.5, 0.4, 0.6, 0.45])]
    report = {"ablation": "x", "description": "d", "keys": ["inner.steps", "inner.adapt"], "metric": "test accuracy",
              "cells": cells}
    table = markdown_table(report)
    assert "| 3 | [head.*] | 45.00 ± 1.00 | seeds | 3 | 45.00, 45.00, 45.00 |" in table
    fig = plot_ablation(report, tmp_path / "f.png")
    assert fig.read_bytes()[:4] == b"\x89PNG"


def test_regression_table_shows_mse_unscaled(tmp_path):
    """A sinusoid ablation reports MSE as is, not as a percentage."""
    from metalearn.ablate import markdown_table, plot_ablation

    cells = [{"values": {"inner.steps": s}, "mean": m, "ci95": 0.02, "seeds": 2, "runs": [{"accuracy": m}] * 2}
             for s, m in [(1, 0.61), (5, 0.35)]]
    report = {"ablation": "x", "description": "", "keys": ["inner.steps"], "metric": "test mse", "cells": cells}
    table = markdown_table(report)
    assert "| inner.steps | mse | interval over | seeds | per seed |" in table and "(%)" not in table
    assert "| 5 | 0.35 ± 0.02 | seeds | 2 | 0.35, 0.35 |" in table
    assert plot_ablation(report, tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_student_t_quantiles_and_intervals():
    from metalearn.stats import t_interval, t_quantile_975

    assert t_quantile_975(1) == 12.706 and t_quantile_975(2) == 4.303
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in [1, 2, 3, 5, 10, 29, 30, 31, 40, 100, 1000]:
        assert t_quantile_975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-3), df
    mean, ci = t_interval([0.5, 0.7])
    assert mean == pytest.approx(0.6) and ci == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2))
    assert ci / (1.96 * math.sqrt(0.02) / math.sqrt(2)) > 6.4  # the normal interval is ~6.5x too narrow at n=2
    assert math.isnan(t_interval([0.5])[1])


def test_one_seed_shows_the_episode_interval_and_categorical_axes_draw_no_lines(tmp_path, recwarn):
    """--seeds 1: the cell's interval is its run's CI over episodes, labelled so; an algorithm axis is
    categorical: markers with error bars, no line joining them, no empty legend (no matplotlib warning)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from metalearn.ablate import _cell_interval, markdown_table, plot_ablation

    runs = {"maml": [{"accuracy": 0.9, "ci95": 0.012}], "anil": [{"accuracy": 0.8, "ci95": 0.015}]}
    cells = []
    for name, rs in runs.items():
        mean, ci, over = _cell_interval(rs)
        cells.append({"values": {"outer.algorithm": name}, "mean": mean, "ci95": ci, "interval": over, "seeds": 1,
                      "runs": rs})
    assert cells[0]["ci95"] == 0.012 and cells[0]["interval"] == "episodes (one seed)"
    report = {"ablation": "algos", "description": "", "keys": ["outer.algorithm"], "metric": "test accuracy",
              "settings": {"outer.iterations": 300, "eval.episodes": 600, "commit": "abc"}, "cells": cells}
    assert "| maml | 90.00 ± 1.20 | episodes (one seed) | 1 | 90.00 |" in markdown_table(report)
    drawn = []
    real_savefig = plt.Figure.savefig

    def spy(fig, *a, **k):
        drawn.append(fig)
        return real_savefig(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        plot_ablation(report, tmp_path / "f.png")
    finally:
        plt.Figure.savefig = real_savefig
    ax = drawn[0].axes[0]
    assert all(len(line.get_xdata()) <= 1 or line.get_linestyle() == "None" for line in ax.get_lines())
    assert ax.get_legend() is None and "outer.iterations=300" in ax.get_title()
    assert not [w for w in recwarn if "legend" in str(w.message).lower()]


def test_multirun_from_the_command_line(tmp_path, capsys):
    """`metalearn train PRESET key=a,b --seeds 2` runs the grid as an ablation (sinusoid: no data needed);
    `--seeds 2` alone runs one cell over seeds; a list value with commas inside brackets is not split."""
    from metalearn.ablate import split_multirun

    assert split_multirun(["inner.adapt=[head.*,features.0.*]", "inner.lr=0.1,0.4"]) == (
        ["inner.adapt=[head.*,features.0.*]"], {"inner.lr": [0.1, 0.4]})
    preset = str(QUICK.parent / "maml_sinusoid.yaml")
    tiny = ["outer.iterations=2", "outer.meta_batch_size=2", "eval.episodes=3", "threads=1", "tracking.progress=false"]
    out = tmp_path / "grid"
    assert main(["train", preset, *tiny, "inner.lr=0.01,0.02", "--seeds", "2", "--out", str(out)]) == 0
    report = json.loads((out / "maml_sinusoid-lr" / "results.json").read_text())
    assert report["keys"] == ["inner.lr"] and [c["values"] for c in report["cells"]] == [{"inner.lr": 0.01},
                                                                                       {"inner.lr": 0.02}]
    assert all(c["seeds"] == 2 and c["interval"] == "seeds (Student t, n=2)" for c in report["cells"])
    assert "multirun maml_sinusoid-lr: 2 cells x 2 seeds = 4 runs" in capsys.readouterr().out
    assert main(["train", preset, *tiny, "--seeds", "2", "--out", str(out)]) == 0
    report = json.loads((out / "maml_sinusoid-seeds" / "results.json").read_text())
    assert report["keys"] == [] and report["cells"][0]["seeds"] == 2
    assert (out / "maml_sinusoid-seeds" / "figure.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["train", preset, "inner.lr=0.01,", "--out", str(out)]) == 2
