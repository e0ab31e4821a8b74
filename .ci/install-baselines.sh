#!/usr/bin/env bash
# Install the baseline meta-learning libraries learn2learn and higher into an
# existing virtual environment, without ever touching its torch or numpy.
# The tests use only learn2learn's MAML/MetaSGD and higher's innerloop_ctx,
# the benchmarks also learn2learn's Cython data pipeline; nothing else.
#
#   usage: .ci/install-baselines.sh PATH/TO/venv/bin/python [--force]
#          (BASELINES_FORCE=1 is the same as --force)
#
# Versions: learn2learn 0.2.0, higher 0.2.1 (latest), torchvision 0.29.1;
# torch pinned to 2.14.1 (must be the one already in the venv); the venv's
# numpy is kept as it is. The dependencies `import learn2learn` needs (gym,
# scipy, requests, tqdm) come at whatever version pip picks.
#
# Not installed, although learn2learn 0.2.0's setup.py lists them:
#   * qpth (and with it cvxpy and its solvers): used only by
#     learn2learn.nn.MetaOptNet's QP head, which no test or benchmark uses.
#     learn2learn/nn/metaoptnet.py imports it as
#         try: from qpth.qp import QPFunction
#         except ImportError: QPFunction = _ImportRaiser('qpth', 'pip install qpth')
#     so `import learn2learn` works without it (checked: with qpth, cvxpy and
#     gsutil made unimportable, learn2learn imports, its MAML adapts and its
#     data pipeline samples tasks). qpth 0.0.18 also declares numpy<2, which
#     would downgrade the venv's numpy.
#   * gsutil (a large tree of Google Cloud packages): learn2learn never imports
#     it; it only runs the `gsutil` command to download QuickDraw.
# Hence learn2learn is installed with --no-deps, and `pip check` reports
# "learn2learn 0.2.0 requires gsutil/qpth, which is not installed": expected.
# (A venv set up by an older version of this script still has qpth and cvxpy;
# they are harmless and left alone.)
#
# Behaviour
#   * Warm path (~0.1 s): the installed versions are read from package metadata
#     (no import: `import learn2learn` alone takes 5-7 s because it imports
#     torch, torchvision, torch._dynamo, gym, ...). If they match and this
#     exact state (python prefix, versions, install times) already passed the
#     full check below, which is recorded in a stamp under .cache/baselines/,
#     print one line and exit 0.
#     If the versions match but there is no stamp, run the full check
#     (`import learn2learn, higher` + smoke test, ~10 s), stamp, exit 0.
#     --force skips both and reinstalls.
#   * Cold path (40 s on 2 busy cores when the dependencies are already
#     there, mostly compiling learn2learn; longer with an empty pip cache):
#       1. make sure cython, numpy, setuptools, wheel are in the venv
#          (learn2learn is built with --no-build-isolation, so they must be);
#       2. download the learn2learn 0.2.0 sdist (the only distribution it has)
#          into .cache/baselines/ (git-ignored; kept for later runs) and unpack
#          it afresh;
#       3. regenerate its C files with the venv's Cython: the .c files shipped
#          in the sdist were made by an old Cython and include
#          `longintrepr.h`, which Python 3.11 moved, so they do not compile;
#          setup.py compiles the .c (not the .pyx) files when pip builds it,
#          hence we overwrite them with `cython -3 *.pyx`;
#       4. pip install higher, torchvision and learn2learn's import-time
#          dependencies, then learn2learn itself with --no-deps (see above);
#          torch and numpy are pinned by a constraints file (torch is also
#          named on the command line) so pip can never up- or downgrade them;
#       5. full check: `import learn2learn, higher, torchvision` with the
#          expected versions (torch must still be 2.14.1), then a smoke test:
#          a second-order meta-gradient through learn2learn.algorithms.MAML
#          and through higher.innerloop_ctx for a tiny Linear model, 2 inner
#          steps (the two must agree, and differ from the first-order one), and
#          a task sampled through learn2learn's Cython-built data pipeline.
#          Then write the stamp.
#
# Compatibility with torch 2.14.1: no source patch is needed. learn2learn 0.2.0
# and higher 0.2.1 use no removed private torch API (no torch._six etc.); MAML
# (1st/2nd order), MetaSGD, GBML, higher with SGD/Adam on Linear, a BatchNorm
# CNN and a GRU all work, with no warnings. Importing learn2learn prints gym
# 0.26.2's "Gym has been unmaintained" notice on stderr (it comes from the
# gym_notices package); harmless, silenced in this script's own checks only.
set -euo pipefail

usage() { echo "usage: $0 PATH/TO/venv/bin/python [--force]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
PY=$1
FORCE=${BASELINES_FORCE:-0}
case "${2:-}" in
    "") ;;
    --force) FORCE=1 ;;
    *) usage ;;
esac
# Make the path absolute (we cd later) but keep the venv's symlink as it is:
# resolving it would leave the venv.
case $PY in
    */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;;
    *) PY=$(command -v "$PY") || { echo "install-baselines: '$1' not found" >&2; exit 2; } ;;
esac
[ -x "$PY" ] || { echo "install-baselines: '$PY' is not an executable python" >&2; exit 2; }

L2L_VERSION=0.2.0
HIGHER_VERSION=0.2.1
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=$REPO_ROOT/.cache/baselines
STAMP_DIR=$BUILD_DIR/verified
export L2L_VERSION HIGHER_VERSION TORCH_VERSION TORCHVISION_VERSION

# Cheap state of the venv from package metadata, without importing anything:
# prints one line (python prefix, versions, install times of the two baseline
# packages), or exits 1 if a package is missing or a version does not match.
metadata_state() {
    "$PY" - <<'EOF'
import os, sys
import importlib.metadata as md
want = {
    "learn2learn": os.environ["L2L_VERSION"],
    "higher": os.environ["HIGHER_VERSION"],
    "torch": os.environ["TORCH_VERSION"],
    "torchvision": os.environ["TORCHVISION_VERSION"],
}
state = [sys.prefix]
try:
    for name in list(want) + ["gym", "numpy"]:
        v = md.version(name)
        if name in want and v.split("+")[0] != want[name]:
            sys.exit(1)
        state.append(f"{name}=={v}")
    for name in ("learn2learn", "higher"):
        init = md.distribution(name).locate_file(f"{name}/__init__.py")
        state.append(f"{name}@{os.stat(init).st_mtime_ns}")
except (md.PackageNotFoundError, OSError):
    sys.exit(1)
print(" ".join(state))
EOF
}

# The full check: imports + versions + smoke test. Prints one line of versions.
full_check() {
    "$PY" - <<'EOF'
import contextlib, io, os, sys, warnings
warnings.simplefilter("ignore")
with contextlib.redirect_stderr(io.StringIO()):  # gym's "unmaintained" notice
    import learn2learn as l2l, higher, torch, torchvision
from importlib.metadata import version

got = {
    "learn2learn": (l2l.__version__, os.environ["L2L_VERSION"]),
    "higher": (version("higher"), os.environ["HIGHER_VERSION"]),
    "torch": (torch.__version__, os.environ["TORCH_VERSION"]),
    "torchvision": (torchvision.__version__, os.environ["TORCHVISION_VERSION"]),
}
bad = {k: v for k, v in got.items() if v[0].split("+")[0] != v[1]}
if bad:
    sys.exit("install-baselines: version mismatch: "
             + ", ".join(f"{k} {g} (want {w})" for k, (g, w) in bad.items()))

torch.manual_seed(0)
x, y = torch.randn(8, 3), torch.randn(8, 1)
loss_fn = torch.nn.MSELoss()

def maml_grads(first_order):
    model = torch.nn.Linear(3, 1)
    model.load_state_dict(init)
    learner = l2l.algorithms.MAML(model, lr=0.1, first_order=first_order).clone()
    for _ in range(2):
        learner.adapt(loss_fn(learner(x), y))
    loss_fn(learner(x), y).backward()
    return [p.grad for p in model.parameters()]

init = torch.nn.Linear(3, 1).state_dict()
# learn2learn MAML, second order.
g = maml_grads(first_order=False)
assert all(t is not None and torch.isfinite(t).all() for t in g), "learn2learn: no meta-gradient"

# The same meta-gradient through higher.
model = torch.nn.Linear(3, 1)
model.load_state_dict(init)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
    for _ in range(2):
        diffopt.step(loss_fn(fmodel(x), y))
    loss_fn(fmodel(x), y).backward()
g2 = [p.grad for p in model.parameters()]
assert all(t is not None for t in g2), "higher: no meta-gradient"
for a, b in zip(g, g2):
    torch.testing.assert_close(a, b)
# The second-order terms are really there: first-order MAML gives another gradient.
assert not torch.allclose(maml_grads(first_order=True)[0], g[0]), "second-order terms missing"

# learn2learn's Cython extensions (meta_dataset, task_dataset, transforms).
from learn2learn.data import MetaDataset, TaskDataset
from learn2learn.data.transforms import NWays, KShots, LoadData
ds = MetaDataset(torch.utils.data.TensorDataset(torch.randn(20, 3), torch.arange(20) % 5))
task = TaskDataset(ds, [NWays(ds, 3), KShots(ds, 2), LoadData(ds)], num_tasks=4).sample()
assert task[0].shape == (6, 3) and len(set(task[1].tolist())) == 3, task

import numpy
print(" ".join(f"{k}=={g}" for k, (g, _) in got.items()), f"numpy=={numpy.__version__}",
      "(smoke test passed: MAML 2nd order == higher meta-gradient; data pipeline)")
EOF
}

stamp_path() { echo "$STAMP_DIR/$(printf '%s' "$1" | sha1sum | cut -c1-16)"; }

# ---- warm path --------------------------------------------------------------
if [ "$FORCE" != 1 ] && state=$(metadata_state 2>/dev/null); then
    stamp=$(stamp_path "$state")
    if [ -f "$stamp" ]; then
        echo "install-baselines: already installed and verified: $(sed -n 2p "$stamp")"
        exit 0
    fi
    if result=$(full_check 2>&1); then
        mkdir -p "$STAMP_DIR"
        printf '%s\n%s\n' "$state" "$result" > "$stamp"
        echo "install-baselines: already installed; verified now: $result"
        exit 0
    fi
    echo "install-baselines: installed but the check failed, reinstalling:" >&2
    echo "$result" | tail -5 >&2
fi

# ---- cold path --------------------------------------------------------------
start=$(date +%s)
mkdir -p "$BUILD_DIR"

# torch must already be 2.14.1 (or absent: then the pin installs 2.14.1).
current_torch=$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || echo none)
case $current_torch in
    none|"$TORCH_VERSION"|"$TORCH_VERSION"+*) ;;
    *) echo "install-baselines: the venv has torch $current_torch, expected $TORCH_VERSION; refusing to replace it" >&2
       exit 1 ;;
esac

CONSTRAINTS=$BUILD_DIR/constraints.txt
printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" > "$CONSTRAINTS"
pip_install() { "$PY" -m pip install --disable-pip-version-check -c "$CONSTRAINTS" "$@"; }

# 1. Build requirements (only those missing).
missing=$("$PY" - <<'EOF'
import importlib.util
mods = {"Cython": "cython", "numpy": "numpy", "setuptools": "setuptools", "wheel": "wheel"}
print(" ".join(pkg for mod, pkg in mods.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "install-baselines: installing build requirements: $missing"
    # shellcheck disable=SC2086
    pip_install $missing
fi

# 2. The learn2learn sdist, unpacked afresh on each install.
SDIST=$BUILD_DIR/learn2learn-$L2L_VERSION.tar.gz
if [ ! -s "$SDIST" ]; then
    "$PY" -m pip download --disable-pip-version-check --no-deps --no-binary :all: \
        -d "$BUILD_DIR" "learn2learn==$L2L_VERSION"
fi
SRC=$BUILD_DIR/learn2learn-$L2L_VERSION
rm -rf "$SRC"
tar -xzf "$SDIST" -C "$BUILD_DIR"

# 3. Regenerate the C sources with a Python-3.11-aware Cython (see the header).
(
    cd "$SRC/learn2learn/data"
    "$PY" -m cython -3 meta_dataset.pyx task_dataset.pyx transforms.pyx
)

# 4. Install; torch and numpy stay pinned (the constraints file gets the
#    venv's numpy now that step 1 has made sure there is one).
numpy_version=$("$PY" -c 'import importlib.metadata as m; print(m.version("numpy"))')
printf 'numpy==%s\n' "$numpy_version" >> "$CONSTRAINTS"

# 4a. higher, torchvision and what `import learn2learn` needs: learn2learn
#     0.2.0's install_requires without qpth and gsutil (see the header).
pip_install \
    "torch==$TORCH_VERSION" \
    "torchvision==$TORCHVISION_VERSION" \
    "higher==$HIGHER_VERSION" \
    "numpy>=1.15.4" "gym>=0.14.0" scipy requests tqdm
# 4b. learn2learn itself, without dependency resolution (it would pull qpth,
#     cvxpy and gsutil) and with --force-reinstall so that a rerun or --force
#     really rebuilds it.
pip_install --no-deps --no-build-isolation --force-reinstall "$SRC"

# 5. Full check, then stamp this state for the warm path.
result=$(full_check)
state=$(metadata_state)
mkdir -p "$STAMP_DIR"
printf '%s\n%s\n' "$state" "$result" > "$(stamp_path "$state")"
echo "install-baselines: installed in $(( $(date +%s) - start )) s: $result"
