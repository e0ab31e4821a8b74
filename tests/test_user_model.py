"""Your own model by import path (model.name=module.path:ClassName, metalearn/models/__init__.py): built from
Python and from `metalearn train`, rebuilt by `metalearn eval` from the checkpoint's config; the errors (a module
that does not import, an attribute that is not an nn.Module subclass, bad model.kwargs) are one line and exit 2
before any work, and nothing that is not a Module is ever called. Also runs the README's "Your own model"
section, so it cannot rot."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalearn.algorithms import MAML
from metalearn.config import load_config
from metalearn.data.benchmark import synthetic_benchmark
from metalearn.errors import MetalearnError
from metalearn.models import build_model, model_arguments
from metalearn.train import build_algorithm

REPO = Path(__file__).resolve().parents[1]
MODULE = "usernets_test"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread

USER_NETS = '''
import pathlib

import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.norm = nn.GroupNorm(2, width)

    def forward(self, x):
        return x + torch.relu(self.norm(self.conv(x)))


class TinyNet(nn.Module):
    """BatchNorm (tracking running statistics, PyTorch's default), GroupNorm and a residual connection."""

    def __init__(self, in_channels, num_classes, width=8):
        super().__init__()
        self.width = width
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.MaxPool2d(2), Residual(width), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class Everything(nn.Module):
    """A **kwargs constructor: receives in_channels, num_classes and image_size, plus model.kwargs."""

    def __init__(self, **kwargs):
        super().__init__()
        self.seen = dict(kwargs)
        self.head = nn.Linear(kwargs["in_channels"] * kwargs["image_size"] ** 2, kwargs["num_classes"])

    def forward(self, x):
        return self.head(x.flatten(1))


def make_net(**kwargs):
    """Not a Module subclass: must never be called (it would leave a file behind)."""
    pathlib.Path(kwargs.get("marker", "called.txt")).write_text("called")
    return TinyNet(1, 5)


NOT_A_CLASS = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """tmp_path/usernets_test.py, importable (sys.path), forgotten afterwards (sys.modules)."""
    (tmp_path / f"{MODULE}.py").write_text(USER_NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    yield tmp_path
    sys.modules.pop(MODULE, None)


def tiny(*overrides):
    return ["data.dataset=omniglot", "data.image_size=16", "data.shots=1", "data.query_shots=2",
            "outer.meta_batch_size=2", *overrides]


# --- from Python ---------------------------------------------------------------------------------
def test_user_model_from_python_trains(user_module):
    cfg = load_config(None, tiny(f"model.name={MODULE}:TinyNet", "model.kwargs={width: 4}"))
    cls, kwargs = model_arguments(cfg.model, 1, 5, 16)
    assert cls.__name__ == "TinyNet" and kwargs == {"in_channels": 1, "num_classes": 5, "width": 4}  # no image_size
    benchmark = synthetic_benchmark(cfg)
    benchmark.load(torch.device("cpu"))
    model = build_model(cfg.model, benchmark.channels, benchmark.outputs, cfg.data.image_size)
    assert model.width == 4 and model.head.out_features == 5
    learner = build_algorithm(cfg, model)
    sampler = benchmark.sampler(cfg.seed, torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        metrics = learner.meta_step(sampler.sample(cfg.outer.meta_batch_size))
        optimizer.step()
    assert set(metrics) == {"loss", "accuracy"} and all(map(torch.isfinite, map(torch.tensor, metrics.values())))
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_kwargs_constructor_gets_the_standard_arguments(user_module):
    cfg = load_config(None, tiny(f"model.name={MODULE}:Everything", "model.kwargs={depth: 3}"))
    model = build_model(cfg.model, 1, 5, 16)
    assert model.seen == {"in_channels": 1, "num_classes": 5, "image_size": 16, "depth": 3}
    # model.hidden and model.batchnorm belong to the shipped models: not passed
    assert MAML(model, inner_lr=0.1, inner_steps=1).adapt == ["head.weight", "head.bias"]


def test_not_a_module_is_refused_without_being_called(user_module, tmp_path, monkeypatch):
    marker = tmp_path / "called.txt"
    with pytest.raises(MetalearnError, match=rf"^model.name={MODULE}:make_net: {MODULE}.make_net is a function, not "
                                             r"a subclass of torch.nn.Module; refusing to call it$"):
        load_config(None, tiny(f"model.name={MODULE}:make_net", f"model.kwargs={{marker: {marker}}}"))
    assert not marker.exists()
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    for name in ["subprocess:run", f"{MODULE}:NOT_A_CLASS", "builtins:object"]:
        with pytest.raises(MetalearnError, match="not a subclass of torch.nn.Module; refusing to call it"):
            load_config(None, tiny(f"model.name={name}"))
        cfg = load_config(None, tiny())
        cfg.model.name = name  # past validation: build_model refuses it as well
        with pytest.raises(MetalearnError, match="refusing to call it"):
            build_model(cfg.model, 1, 5, 16)
    assert not calls and not marker.exists()


@pytest.mark.parametrize("name,kwargs,match", [
    ("nosuch_pkg.nets:Net", "{}", r"^model.name=nosuch_pkg.nets:Net: cannot import nosuch_pkg.nets \(No module named "
                                  r"'nosuch_pkg'\); is its folder on PYTHONPATH\?$"),
    (f"{MODULE}:Missing", "{}", rf"^model.name={MODULE}:Missing: {MODULE} has no attribute 'Missing'$"),
    (":TinyNet", "{}", "an import path is module.path:ClassName"),
    (f"{MODULE}:TinyNet", "{depth: 2}", rf"^model.kwargs: {MODULE}:TinyNet takes no option 'depth' \(its options: "
                                        r"width\)$"),
    (f"{MODULE}:TinyNet", "{num_classes: 2}", r"^model.kwargs: num_classes is set by metalearn \(from data.ways\)"),
    ("torch.nn:Linear", "{}", r"^model.kwargs: torch.nn:Linear's constructor needs in_features, out_features \(no "
                              r"default\); give them in model.kwargs$"),
])
def test_errors_name_the_key(user_module, name, kwargs, match):
    with pytest.raises(MetalearnError, match=match):
        load_config(None, tiny(f"model.name={name}", f"model.kwargs={kwargs}"))


def test_a_module_that_fails_on_import_is_one_line(user_module):
    (user_module / "broken_nets_test.py").write_text("import torch\nraise RuntimeError('no GPU\\nhere')\n")
    try:
        with pytest.raises(MetalearnError, match=r"cannot import broken_nets_test \(no GPU here\)"):
            load_config(None, tiny("model.name=broken_nets_test:Net"))
    finally:
        sys.modules.pop("broken_nets_test", None)


def test_user_model_for_sinusoid_regression(user_module):
    """A user model may take the sinusoid's 1-d inputs (the shipped image models may not)."""
    cfg = load_config(None, ["data.dataset=sinusoid", "data.ways=1", f"model.name={MODULE}:Everything",
                             "data.image_size=1"])
    assert build_model(cfg.model, 1, 1, cfg.data.image_size)(torch.randn(4, 1)).shape == (4, 1)
    with pytest.raises(MetalearnError, match="model.name=resnet12 cannot take sinusoid inputs"):
        load_config(None, ["data.dataset=sinusoid", "data.ways=1", "model.name=resnet12"])


# --- from the command line -----------------------------------------------------------------------
def console(*args, cwd, env=None, timeout=300):
    """The `metalearn` console script (its sys.path lacks the working folder) or, without one, python -m.
    env: variables to set; None unsets one."""
    script = Path(sys.executable).parent / "metalearn"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "metalearn"]
    full = {k: v for k, v in {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}.items() if v is not None}
    return subprocess.run([*cmd, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc, match):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metalearn: error:") and match in lines[0], proc.stderr


QUICK = ["omniglot_5w1s_quick", "outer.iterations=2", "outer.meta_batch_size=2", "eval.episodes=2",
         "eval.query_shots=2", "threads=1", "tracking.progress=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root, cache_dir):
    """`metalearn train` of TinyNet with PYTHONPATH naming its folder (run from another folder)."""
    folder = tmp_path_factory.mktemp("user")
    (folder / f"{MODULE}.py").write_text(USER_NETS)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    env = {"METALEARN_DATA": str(data_root), "METALEARN_CACHE": str(cache_dir), "PYTHONPATH": str(folder)}
    proc = console("train", *QUICK, f"model.name={MODULE}:TinyNet", "model.kwargs={width: 4}",
                   f"tracking.out_dir={folder / 'runs'}", "tracking.name=tiny", cwd=elsewhere, env=env)
    assert proc.returncode == 0, proc.stderr
    return folder, folder / "runs" / "tiny", env


def test_cli_train_records_the_model(trained):
    folder, run, _ = trained
    assert (run / "eval-test.json").is_file()
    config = (run / "config.yaml").read_text()
    assert f"name: {MODULE}:TinyNet" in config and "width: 4" in config
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["model"]["name"] == f"{MODULE}:TinyNet" and ckpt["config"]["model"]["kwargs"] == {"width": 4}
    assert ckpt["model"]["features.4.norm.weight"].shape == (4,)  # the GroupNorm of the residual block


def test_cli_eval_rebuilds_the_model_from_the_working_folder(trained):
    """`metalearn eval` from the folder holding the module, with no PYTHONPATH: the console script appends
    the working folder to sys.path."""
    folder, run, env = trained
    env = {**env, "PYTHONPATH": None}
    proc = console("eval", str(run), "--episodes", "3", "--no-progress", cwd=folder, env=env)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"test accuracy: [\d.]+ ± [\d.]+% \(95% CI\) over 3 5-way 1-shot episodes", proc.stdout)


def test_cli_eval_elsewhere_says_where_to_look(trained):
    folder, run, env = trained
    env = {**env, "PYTHONPATH": None}
    elsewhere = console("eval", str(run), "--episodes", "3", cwd=folder.parent, env=env)
    one_line_error(elsewhere, f"saved config: model.name={MODULE}:TinyNet: cannot import {MODULE} (No module named "
                              f"'{MODULE}'); is its folder on PYTHONPATH?")


@pytest.mark.parametrize("overrides,match", [
    (["model.name=nosuch_pkg.nets:Net"], "model.name=nosuch_pkg.nets:Net: cannot import nosuch_pkg.nets"),
    (["model.name=subprocess:run"], "model.name=subprocess:run: subprocess.run is a function, not a subclass of "
                                    "torch.nn.Module; refusing to call it"),
    ([f"model.name={MODULE}:TinyNet", "model.kwargs={depth: 2}"], f"model.kwargs: {MODULE}:TinyNet takes no option "
                                                                   f"'depth'"),
])
def test_cli_errors_before_any_work(user_module, tmp_path, overrides, match):
    proc = console("train", *QUICK, *overrides, f"tracking.out_dir={tmp_path / 'runs'}", cwd=user_module,
                   env={"METALEARN_DATA": str(tmp_path / "no-data")})  # no data needed to fail
    one_line_error(proc, match)
    assert not (tmp_path / "runs").exists()


# --- the README's "Your own model" section ----------------------------------------------------------
def readme_section(title: str) -> str:
    """The README's `### title` section, up to the next heading of level 1-3 outside a code block."""
    lines, out, fenced = (REPO / "README.md").read_text().splitlines(), None, False
    for line in lines:
        if out is None:
            out = [] if line == f"### {title}" else None
            continue
        fenced ^= line.startswith("```")
        if not fenced and re.match(r"#{1,3} ", line):
            break
        out.append(line)
    assert out, f"README.md has no section '### {title}'"
    return "\n".join(out) + "\n"


def code_blocks(section: str) -> "list[tuple[str, str]]":
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def shrink(code: str, replacements: dict) -> str:
    for old, new in replacements.items():
        assert old in code, f"the README example no longer holds {old!r}; update this test"
        code = code.replace(old, new)
    return code


def readme_example(tmp_path) -> "tuple[str, str]":
    """Writes the README's mynets.py into tmp_path; returns (the Python example, the shell commands)."""
    blocks = code_blocks(readme_section("Your own model"))
    (model_file, python), (shell,) = [[c for lang, c in blocks if lang == want] for want in ("python", "bash")]
    assert model_file.startswith("# mynets.py\n")
    (tmp_path / "mynets.py").write_text(model_file)
    return python, shell


def test_readme_python_example_runs(tmp_path, monkeypatch, data_root, cache_dir):
    """The README's model file and Python example, with 2 meta-steps and 2 test episodes."""
    python, _ = readme_example(tmp_path)
    monkeypatch.setenv("METALEARN_DATA", str(data_root))
    monkeypatch.setenv("METALEARN_CACHE", str(cache_dir))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mynets", raising=False)
    try:
        exec(compile(shrink(python, {"range(100)": "range(2)", '"test", 100': '"test", 2'}), "README", "exec"), {})
    finally:
        sys.modules.pop("mynets", None)


def test_readme_commands_run(tmp_path, data_root, cache_dir):
    """The README's `metalearn train` and `metalearn eval` lines, in the folder holding mynets.py, at tiny sizes."""
    _, shell = readme_example(tmp_path)
    env = {"METALEARN_DATA": str(data_root), "METALEARN_CACHE": str(cache_dir), "PYTHONPATH": None}
    small = {"train": [*QUICK[1:], "tracking.out_dir=runs"], "eval": ["--episodes", "2", "--no-progress"]}
    commands = [shlex.split(line) for line in shell.splitlines() if line.startswith("metalearn ")]
    assert [c[1] for c in commands] == ["train", "eval"]
    for command in commands:
        proc = console(*command[1:], *small[command[1]], cwd=tmp_path, env=env)
        assert proc.returncode == 0, (command, proc.stderr)
    assert "test accuracy:" in proc.stdout and (tmp_path / "runs" / "mynet" / "checkpoint.pt").is_file()
