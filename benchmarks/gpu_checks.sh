#!/usr/bin/env bash
# The device checks, as one prepared command that fits the device tool's 10-minute limit, for a
# session that is lent a GPU (15 minutes of device time in all). From the repository root there:
#
#   bash benchmarks/gpu_checks.sh                 # results under $OUT (default ./gpu-out)
#   DRY_RUN=1 bash benchmarks/gpu_checks.sh       # the same steps on this CPU, tiny: checks the script
#
# Steps, each with its own time limit (seconds, summing to under 600 with BUDGET=570):
#   1. CUDA exactness: the gpu-marked tests and tests/test_batched.py, test_float32_real.py on CUDA.
#   2. bench_meta_step.py, every row, our paths against learn2learn and higher (when installed).
#   3. check_precision.py: fp32 / tf32 / bf16 against float64.
#   4. The full-protocol MAML Omniglot 5w1s reproduction (60,000 steps, experiments/reproduce.py) for
#      the time that is left, as one resumable piece: the run folder comes back as $OUT/maml_run.tgz;
#      carry it to the next session's call (tar -xzf into runs/reproduce) and the run continues where
#      it stopped. A finished run writes its result JSON into $OUT.
#
# Data: cp -r ../shared/data/omniglot .data/ (ignored) and carry ".data". Baselines (no internet
# there): pip download --no-deps higher==0.2.1 -d .gpu, carry ".gpu"; learn2learn needs its Cython
# build for the GPU machine's Python and is skipped unless a wheel for it is in .gpu/ too.
# A previous piece of step 4: carry "runs/reproduce".
set -u
OUT=${OUT:-$PWD/gpu-out}
DRY_RUN=${DRY_RUN:-0}
BUDGET=${BUDGET:-570}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export METALEARN_DATA=${METALEARN_DATA:-$PWD/.data} METALEARN_CACHE=${METALEARN_CACHE:-$PWD/.cache/metalearn}
START=$(date +%s)
log() { echo "== $(date +%T) [$(( $(date +%s) - START )) s] $*" | tee -a "$OUT/log.txt"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
PY=${PYTHON:-python}

if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu; REPS=1; WARMUP=0; ROWS=sinusoid; SEEDS=1; TEST_SEL="tests/test_precision.py"
  REPRO_SET=(--set outer.iterations=4 --set eval.episodes=4 --set model.hidden=8 --set eval.val_every=0 --set threads=1)
  RUNS=$OUT/runs
  log "DRY RUN on the CPU: tiny settings, to check the script itself"
else
  DEVICE=cuda; REPS=20; WARMUP=3; ROWS=""; SEEDS=2; TEST_SEL="tests/test_batched.py tests/test_float32_real.py"
  REPRO_SET=()
  RUNS=runs/reproduce
  log "device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/log.txt"
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/log.txt"
if ls .gpu/*.whl >/dev/null 2>&1; then
  log "installing carried baseline wheels"; pip install --no-deps --no-index .gpu/*.whl >>"$OUT/log.txt" 2>&1
fi

log "1. exactness tests"
timeout 150 $PY -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tail -3 | tee -a "$OUT/log.txt"
timeout 120 $PY -m pytest -q $TEST_SEL -p no:cacheprovider 2>&1 | tail -3 | tee -a "$OUT/log.txt"

log "2. meta-step benchmark against learn2learn / higher"
timeout 200 $PY benchmarks/bench_meta_step.py --device $DEVICE --reps $REPS --warmup $WARMUP \
  ${ROWS:+--rows $ROWS} --out "$OUT/meta_step_$DEVICE.json" 2>&1 | grep -v -i gym | tee -a "$OUT/log.txt"

log "3. reduced precision against float64"
timeout 60 $PY benchmarks/check_precision.py --device $DEVICE --seeds $SEEDS ${ROWS:+--rows $ROWS} \
  --out "$OUT/precision_$DEVICE.json" 2>&1 | tail -8 | tee -a "$OUT/log.txt"

T=$(( $(left) - 30 ))
if [ -d "$METALEARN_DATA/omniglot" ] && [ "$T" -gt 60 ]; then
  log "4. MAML Omniglot 5w1s, full protocol, resumable: one piece of $T s"
  timeout $(( T + 25 )) $PY experiments/reproduce.py maml_omniglot_5w1s --device $DEVICE --one-piece \
    --piece-minutes "$(awk "BEGIN {print $T / 60}")" --runs-dir "$RUNS" --out "$OUT" ${REPRO_SET[@]+"${REPRO_SET[@]}"} \
    2>&1 | tail -5 | tee -a "$OUT/log.txt"
  [ -d "$RUNS/maml_omniglot_5w1s-seed0" ] && tar -czf "$OUT/maml_run.tgz" -C "$RUNS" maml_omniglot_5w1s-seed0
else
  log "4. skipped: no $METALEARN_DATA/omniglot or only $T s left"
fi
log "done"
