#!/usr/bin/env bash
# The device checks, as one prepared command for a session that is lent a GPU (about 15 minutes of
# device time, 10 per command). Run from the repository root on the GPU machine:
#
#   bash benchmarks/gpu_checks.sh            # results under $OUT (default ./gpu-out)
#
# Optional baselines (the GPU machine has no internet): on the development machine, before the call,
#   echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu
#   pip download --no-deps higher==0.2.1 -d .gpu            # pure Python wheel
# and pass carry=[".gpu"]; learn2learn needs its Cython build for the GPU machine's Python and is
# skipped there unless a wheel for that Python is in .gpu/ too.
# Omniglot for the sampler benchmark: cp -r ../shared/data/omniglot .data/ (ignored) and carry ".data".
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log() { echo "== $(date +%T) $*" | tee -a "$OUT/log.txt"; }

log "device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/log.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/log.txt"
if ls .gpu/*.whl >/dev/null 2>&1; then
  log "installing carried baseline wheels"; pip install --no-deps --no-index .gpu/*.whl >>"$OUT/log.txt" 2>&1
fi

log "GPU tests (exactness of the batched path on CUDA)"
timeout 120 python -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tail -5 | tee -a "$OUT/log.txt"
timeout 120 python -m pytest -q tests/test_batched.py -p no:cacheprovider 2>&1 | tail -3 | tee -a "$OUT/log.txt"

log "meta-step benchmark, all rows"
timeout 330 python benchmarks/bench_meta_step.py --device cuda --reps 20 --warmup 3 \
  --paths loop,batched,hybrid,learn2learn,higher --out "$OUT/meta_step_cuda.json" 2>&1 | grep -v -i gym | tee -a "$OUT/log.txt"

log "reduced precision: meta-gradient error of fp32 / tf32 / bf16 against float64"
timeout 90 python benchmarks/check_precision.py --device cuda --seeds 2 --out "$OUT/precision_cuda.json" 2>&1 | tail -20 | tee -a "$OUT/log.txt"

if [ -d .data/omniglot ] && python -c "import learn2learn" 2>/dev/null; then
  log "sampler benchmark (needs learn2learn)"
  METALEARN_DATA=$PWD/.data METALEARN_CACHE=$PWD/.cache/metalearn timeout 180 \
    python benchmarks/bench_sampler.py --device cuda --min-seconds 2 --out "$OUT/sampler_cuda.json" 2>&1 | tail -4 | tee -a "$OUT/log.txt"
fi
log "done"
