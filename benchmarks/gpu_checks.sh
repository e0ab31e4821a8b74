#!/usr/bin/env bash
# The device checks, as one prepared command that fits the device tool's 10-minute limit, for a
# session that is lent a GPU (15 minutes of device time in all, the machine's start included). From the
# repository root there:
#
#   bash benchmarks/gpu_checks.sh                 # results under $OUT (default ./gpu-out)
#   DRY_RUN=1 bash benchmarks/gpu_checks.sh       # the same steps on this CPU, tiny: checks the script
#
# Steps, each under its own time limit (BUDGET seconds in all, default 480); every step writes its JSON as
# it goes, so one stopped by its limit still returns what it finished:
#   1. CUDA exactness: the gpu-marked tests (float32 on CUDA against the loop, precision switches).
#   2. bench_meta_step.py on CUDA against learn2learn and higher, in priority order: conv4 row 1, ResNet-12
#      1 and 5 steps, the user model, then the other conv4 rows. Each row first checks every path's
#      meta-gradient against the loop's in float64 on the GPU (the gate: 1e-8 relative), so this is also
#      the exactness check of the batched, hybrid and generic vmap paths on CUDA. --in-process: on the lent
#      H200 a fresh process per path cost ~15 s (2026-11-30), which left most rows unmeasured; in one
#      process steps 1-4 took 343 s (the second GPU session).
#   3. torch.compile (outer.compile) on conv4 row 1 against eager batched: its first step includes the
#      compilation (68 and 86 s on the H200 with an empty inductor cache, 2026-11-30).
#   4. check_precision.py: fp32 / tf32 / bf16 against float64 on CUDA (noise batches), and float32 of
#      every path on real Omniglot batches (--real; needs .data).
#   Then step 2's other conv4 rows for the time left.
#   5. Only with REPRO=1: the full-protocol MAML Omniglot 5w1s reproduction (experiments/reproduce.py) for
#      the time left, as one resumable piece; the run folder comes back as $OUT/maml_run.tgz (carry it to
#      the next call, tar -xzf into runs/reproduce, and the run continues where it stopped).
#
# Baselines (no internet there, and neither is installed) and metalearn's own needs missing there (omegaconf,
# pooch, platformdirs): wheels for the GPU machine's Python 3.12 in .gpu/ (ignored), carried; build them here
# first with `bash benchmarks/gpu_wheels.sh` (10 s; it says how learn2learn's sdist is made to build).
# Data for steps 4 and 5: cp -r ../shared/data/omniglot .data/ (ignored), carry ".data" and, to skip decoding
# it there, the two .cache/metalearn/omniglot-28px-* files. Command (device tool, timeout_s 540):
#   OUT=$OUT BUDGET=480 PYTHON=python3 bash benchmarks/gpu_checks.sh      carry: .gpu .data (+ the cache files)
set -u
OUT=${OUT:-$PWD/gpu-out}
DRY_RUN=${DRY_RUN:-0}
REPRO=${REPRO:-0}
BUDGET=${BUDGET:-480}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export METALEARN_DATA=${METALEARN_DATA:-$PWD/.data} METALEARN_CACHE=${METALEARN_CACHE:-$PWD/.cache/metalearn}
START=$(date +%s)
log() { echo "== $(date +%T) [$(( $(date +%s) - START )) s] $*" | tee -a "$OUT/log.txt"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
PY=${PYTHON:-python}

if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu; REPS=1; WARMUP=0; SEEDS=1; TESTS=(tests/test_precision.py)
  ROWS1=sinusoid; ROWS2=sinusoid; ROWS3=""; PREC_ROWS=sinusoid
  COMPILE_ROW=sinusoid; COMPILE_PATHS=loop,batched  # compiling takes a minute on a CPU; tests/test_compiled.py does it
  REPRO_SET=(--set outer.iterations=4 --set eval.episodes=4 --set model.hidden=8 --set eval.val_every=0 --set threads=1)
  RUNS=$OUT/runs
  log "DRY RUN on the CPU: tiny settings, to check the script itself"
else
  DEVICE=cuda; REPS=10; WARMUP=3; SEEDS=2; TESTS=(-m gpu tests/)
  ROWS1=omniglot-5w1s-1step,resnet12-5w1s-1step,user-5w1s-1step
  ROWS2=resnet12-5w1s-5step
  ROWS3=omniglot-5w1s-5step,miniimagenet-5w5s-5step,omniglot-20w1s-5step,omniglot-5w1s-fo,sinusoid
  PREC_ROWS=""; COMPILE_ROW=omniglot-5w1s-1step; COMPILE_PATHS=loop,batched,compiled-batched
  REPRO_SET=()
  RUNS=runs/reproduce
  log "device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/log.txt"
fi
if ls .gpu/*.whl >/dev/null 2>&1; then
  log "installing the carried baseline wheels into /tmp/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl \
    >>"$OUT/log.txt" 2>&1 && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/log.txt"
$PY -c "import learn2learn, higher; print('learn2learn', learn2learn.__version__, 'higher ok')" 2>&1 | tail -1 \
  | tee -a "$OUT/log.txt"

log "1. exactness tests (gpu-marked)"
timeout 90 $PY -m pytest -q "${TESTS[@]}" -p no:cacheprovider 2>&1 | tail -3 | tee -a "$OUT/log.txt"

bench() {  # bench ROWS CHECK OUT LIMIT [PATHS [WARMUP]]
  timeout "$4" $PY benchmarks/bench_meta_step.py --device $DEVICE --in-process --reps $REPS --warmup "${6:-$WARMUP}" \
    --rows "$1" --paths "${5:-loop,batched,hybrid,learn2learn,higher}" --check "$2" --out "$OUT/$3" 2>&1 \
    | grep -v -i gym | tee -a "$OUT/log.txt"
}
log "2. meta-step benchmark against learn2learn / higher"
bench "$ROWS1" float64 meta_step_$DEVICE.json 150
bench "$ROWS2" float32 meta_step_${DEVICE}_resnet12_5step.json 90

if [ "$REPRO" = 1 ] && [ "$DRY_RUN" != 1 ]; then
  log "3. skipped: REPRO=1 leaves the time to the reproduction"
else
  log "3. torch.compile against eager batched, row $COMPILE_ROW"
  bench "$COMPILE_ROW" float32 meta_step_${DEVICE}_compiled.json 150 "$COMPILE_PATHS" 1
fi

log "4. reduced precision against float64 (noise batches), and float32 on real Omniglot batches"
timeout 45 $PY benchmarks/check_precision.py --device $DEVICE --seeds $SEEDS ${PREC_ROWS:+--rows $PREC_ROWS} \
  --out "$OUT/precision_$DEVICE.json" 2>&1 | tail -8 | tee -a "$OUT/log.txt"
if [ -d "$METALEARN_DATA/omniglot" ]; then
  timeout 40 $PY benchmarks/check_precision.py --real --device $DEVICE --seeds $SEEDS \
    --out "$OUT/precision_real_$DEVICE.json" 2>&1 | tail -5 | tee -a "$OUT/log.txt"
fi

T=$(( $(left) - 5 ))
if [ -n "$ROWS3" ] && [ "$REPRO" != 1 ] && [ "$T" -gt 30 ]; then
  log "2b. the other rows, for the $T s left"
  bench "$ROWS3" float64 meta_step_${DEVICE}_more.json $T
fi

T=$(( $(left) - 30 ))
if [ "$REPRO" = 1 ] && [ -d "$METALEARN_DATA/omniglot" ] && [ "$T" -gt 60 ]; then
  log "5. MAML Omniglot 5w1s, full protocol, resumable: one piece of $T s"
  timeout $(( T + 25 )) $PY experiments/reproduce.py maml_omniglot_5w1s --device $DEVICE --one-piece \
    --piece-minutes "$(awk "BEGIN {print $T / 60}")" --runs-dir "$RUNS" --out "$OUT" ${REPRO_SET[@]+"${REPRO_SET[@]}"} \
    2>&1 | tail -5 | tee -a "$OUT/log.txt"
  [ -d "$RUNS/maml_omniglot_5w1s-seed0" ] && tar -czf "$OUT/maml_run.tgz" -C "$RUNS" maml_omniglot_5w1s-seed0
elif [ "$REPRO" = 1 ]; then
  log "5. skipped: no $METALEARN_DATA/omniglot or only $T s left"
fi
log "done"
