#!/usr/bin/env bash
# Build the wheels benchmarks/gpu_checks.sh installs on a lent GPU machine, whose Python (3.12) has torch but
# neither the baselines (learn2learn, higher) nor metalearn's lighter needs, and no internet. Run here, from
# the repository root, before the device call; the wheels land in .gpu/ (ignored), which the call carries:
#
#   bash benchmarks/gpu_wheels.sh            # needs a Python 3.12 (PY312=..., default: pyenv's 3.12)
#
# learn2learn 0.2.0 is published as an sdist whose C files came from an old Cython that Python 3.12 cannot
# compile (longintrepr.h); they are regenerated from its .pyx files with Cython 3 first. gym is what
# learn2learn imports at start; higher, gym, gym_notices, omegaconf, pooch and platformdirs are pure Python.
set -euo pipefail
OUT=${OUT:-$PWD/.gpu}
PY312=${PY312:-$(PYENV_VERSION=3.12.1 pyenv which python 2>/dev/null || command -v python3.12 || true)}
if [ -z "$PY312" ] || ! "$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  echo "metalearn: error: no Python 3.12 found (set PY312=/path/to/python3.12)" >&2
  exit 2
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY312" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q cython setuptools wheel
mkdir -p "$OUT"
"$WORK/venv/bin/pip" wheel -q --no-deps -w "$OUT" higher==0.2.1 gym==0.26.2 gym_notices omegaconf==2.4.0 pooch \
  platformdirs
"$WORK/venv/bin/pip" download -q --no-deps --no-binary :all: -d "$WORK" learn2learn==0.2.0
tar -xzf "$WORK"/learn2learn-0.2.0.tar.gz -C "$WORK"
(cd "$WORK/learn2learn-0.2.0" && for f in learn2learn/data/*.pyx; do "$WORK/venv/bin/cython" -3 "$f"; done \
  && "$WORK/venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$OUT" .)
ls -1 "$OUT"
