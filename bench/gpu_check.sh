#!/usr/bin/env bash
# The whole GPU measurement of the benchmark suite in one go: at most about 7 minutes on an
# H100/H200 (330 s for the bench steps, 60 s for the kernels).
#
#   bash bench/gpu_check.sh                 # from the repository root, on the GPU machine
#   BENCH_SMOKE=1 BENCH_DEVICE=cpu BENCH_EXTRA_ARGS="--threads 1" bash bench/gpu_check.sh
#                                           # the same steps, tiny, on a CPU (plumbing check)
#
# Steps (each under its own time limit, so one failure or stall never costs the rest):
#   1. CIFAR ResNet-18 fp32, batch 256: every method; engine backends at chunks 64..512
#   2. pool-size scaling: rank_unlabeled on 10k, 100k, 1M synthetic samples (small CNN)
#   3. CIFAR ResNet-18 bf16 and 4. tf32, batch 256
#   5. MobileNetV3-small fp32 (224 px), batch 128;  6. the small transformer fp32, batch 128
#   7. the scaling of step 2 with backend="vmap", for contrast
#   8. the Triton kernels against their torch references (bench/bench_kernels.py)
#
# Writes into $OUT (default bench/results/gpu-run), at most 8 files: summary.md (every table
# with the command that produced it: paste it into bench/results/<card>.md), resnet18-fp32.json
# and .png, scaling.json, kernels.json, all.tar.gz (every JSON, plot, markdown and log), log.txt.
#
# Needs python3 with a CUDA torch; no network and nothing to build: the package runs from this
# checkout, staged into a scratch folder with kernels/ as gradnorm_engine.kernels (the installed
# layout). Opacus is optional: carried in .gpu-deps/ (here: pip install --no-deps --target
# .gpu-deps opacus) it is measured, otherwise its row says it is not installed.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DEVICE=${BENCH_DEVICE:-cuda}
OUT=${OUT:-bench/results/gpu-run}
WORK=$(mktemp -d)
STAGE=$(mktemp -d)
mkdir -p "$OUT"
LOG="$WORK/log.txt"
BUDGET_S=${BENCH_BUDGET_S:-330}   # hard cap for all steps together
EXTRA=${BENCH_EXTRA_ARGS:-}       # appended to every bench command

cp -r gradnorm_engine "$STAGE/"
rm -rf "$STAGE/gradnorm_engine/kernels"
cp -r kernels "$STAGE/gradnorm_engine/kernels"
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu-deps ] && export PYTHONPATH="$PYTHONPATH:$(pwd)/.gpu-deps"
export MPLBACKEND=Agg

if [ "${BENCH_SMOKE:-0}" = 1 ]; then
  # Plumbing check: tiny models and sizes, same steps and files.
  R18="--width 4 --batch-size 4 --repeats 2 --warmup 1 --loop-samples 2 --batches 2"
  SMALL="--batch-size 2 --repeats 2 --warmup 1 --loop-samples 2 --batches 2"
  CHUNKS=2,4; POOLS=256,1024; B256=""; B128=""
else
  R18="--repeats 10 --warmup 3 --loop-samples 16 --batches 4"
  SMALL="--repeats 10 --warmup 3 --loop-samples 16 --batches 4"
  CHUNKS=64,128,256,512; POOLS=10000,100000,1000000; B256="--batch-size 256"; B128="--batch-size 128"
fi

{
  echo "# gpu_check.sh $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "checkout: $(git rev-parse --short HEAD 2>/dev/null || echo 'no git metadata')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu \
    --format=csv 2>&1 || echo "nvidia-smi not available"
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 || true
  "$PY" -c "import gradnorm_engine.benchmark, gradnorm_engine.kernels; from gradnorm_engine.backends import BACKENDS; print('backends', list(BACKENDS))"
} 2>&1 | tee "$LOG"

# Engine backends other than the per-sample loop: the chunk sweep times those.
SWEEP=$("$PY" -c "from gradnorm_engine.backends import BACKENDS; print(','.join(b for b in BACKENDS if b != 'loop'))")

START=$SECONDS
step() {  # step NAME LIMIT_S ARGS...: one bench invocation with its own time limit
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then echo "== $name: skipped, the time budget is spent" | tee -a "$LOG"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$PY" -m gradnorm_engine.cli bench --device "$DEVICE" "$@" $EXTRA \
    --json "$WORK/$name.json" --markdown "$WORK/$name.md" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
  [ "$rc" -ne 0 ] && tail -n 20 "$LOG"
}

step resnet18-fp32 90 --model resnet18 --dtype fp32 $B256 $R18 --chunk-sizes $CHUNKS --chunk-backends "$SWEEP"
step scaling 75 --no-methods --scaling $POOLS --scaling-model small_cnn --dtype fp32
step resnet18-bf16 45 --model resnet18 --dtype bf16 $B256 $R18
step resnet18-tf32 45 --model resnet18 --dtype tf32 $B256 $R18
step mobilenet-fp32 50 --model mobilenet_v3_small --dtype fp32 $B128 $SMALL
step transformer-fp32 45 --model transformer --dtype fp32 $B128 $SMALL
step scaling-vmap 45 --no-methods --scaling $POOLS --scaling-model small_cnn --scaling-backend vmap --dtype fp32

# 8. kernels: a script of its own, not a bench subcommand; its table goes to the summary.
left=$((BUDGET_S + 60 - (SECONDS - START)))
if [ "$DEVICE" = cuda ] && [ "$left" -ge 20 ]; then
  [ "$left" -gt 60 ] && left=60
  echo "== kernels (limit ${left}s)" | tee -a "$LOG"
  { echo "## Triton kernels vs torch references"; echo; echo "Command: \`python bench/bench_kernels.py --json kernels.json\`"; echo; echo '```'
    timeout --kill-after=10 "$left" "$PY" bench/bench_kernels.py --json "$WORK/kernels.json" 2>&1; echo "exit $?"
    echo '```'; echo; } >"$WORK/kernels.md"
  tail -n 3 "$WORK/kernels.md" | tee -a "$LOG"
fi
echo "== all steps: $((SECONDS - START))s" | tee -a "$LOG"

{
  echo "# Benchmark on $("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')" 2>/dev/null)"
  echo
  echo "Produced by \`bash bench/gpu_check.sh\` ($(date -u '+%Y-%m-%d %H:%M UTC')); each section names its command."
  echo
  for name in resnet18-fp32 scaling resnet18-bf16 resnet18-tf32 mobilenet-fp32 transformer-fp32 scaling-vmap kernels; do
    if [ -f "$WORK/$name.md" ]; then cat "$WORK/$name.md"; else echo "## $name: no result (see log.txt)"; echo; fi
  done
} >"$WORK/summary.md"

cp "$WORK/summary.md" "$LOG" "$OUT/"
for f in resnet18-fp32.json resnet18-fp32.png scaling.json kernels.json; do [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"; done
tar czf "$OUT/all.tar.gz" -C "$WORK" .
rm -rf "$STAGE"
echo
cat "$OUT/summary.md"
