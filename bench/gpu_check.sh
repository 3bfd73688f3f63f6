#!/usr/bin/env bash
# The whole GPU measurement in one go, in two parts that can also run alone:
#
#   bash bench/gpu_check.sh          # both parts (at most ~10 minutes on an H100/H200)
#   bash bench/gpu_check.sh hooks    # part 1 only: the hooks backend (issue 3), at most ~5 min
#   bash bench/gpu_check.sh suite    # part 2 only: the benchmark suite, at most ~6.5 min
#   bash bench/gpu_check.sh tests    # step h5 only: the CUDA tests, at most ~2.5 min
#   bash bench/gpu_check.sh issue18  # the "On the GPU" issue's measurements, at most ~9.5 min
#   BENCH_SMOKE=1 BENCH_DEVICE=cpu BENCH_EXTRA_ARGS="--threads 1" bash bench/gpu_check.sh suite
#                                    # part 2, tiny, on a CPU (plumbing check)
#
# Part 1, hooks (CIFAR ResNet-18, batch 256):
#   h1. hooks vs a training step (forward+backward) side by side, fp32 with TF32 off, and
#   h2. bf16 autocast + channels_last     (bench/hooks_vs_training_step.py), and h8. the same at
#       batch 1024: bf16 at 256 is host-bound, does a 4x larger chunk amortise the overhead?
#   h3. where the time goes, fp32, and h4. bf16 + channels_last (bench/hooks_profile.py)
#   h5. the CUDA tests: compiled kernels and the hooks backend against the per-sample loop
#   h6. the Triton kernels against their torch references, the Gram form and cuDNN's batched
#       weight gradient (bench/bench_kernels.py), and h7. the conv and BatchNorm rows in bf16 channels_last
# Part 2, suite (gradnorm-engine bench):
#   1. CIFAR ResNet-18 fp32, batch 256: every method; engine backends at chunks 64..512
#   2. pool-size scaling: rank_unlabeled on 10k, 100k, 1M synthetic samples (small CNN)
#   3. CIFAR ResNet-18 bf16 and 4. tf32, batch 256
#   5. MobileNetV3-small fp32 (224 px), batch 128;  6. the small transformer fp32, batch 128
#   7. the scaling of step 2 with backend="vmap", for contrast
# Part issue18 (what the "On the GPU" issue asks to have measured, in one lease):
#   g1. the starting point: h1 (fp32) and h2 (bf16 + channels_last) as above
#   g2. the profiles h3 and h4 (where the time goes), g3. the CUDA tests (h5)
#   g4. the transformer rows: ViT-B/16 at 224 px and BERT-base at 128 tokens, batch 64, fp32 and
#       bf16: hooks, fwd_bwd, forward (gradnorm-engine bench --json: the rows for the results file)
#   g5. a 1,000,000-sample CIFAR-size pool (uint8 on the GPU) ranked end to end, bf16 + channels_last,
#       at 100k, 300k and 1M samples: time and peak memory (bench/pool_1m.py)
#   g6. the kernels against cuDNN's batched weight gradient (h6)
#
# Writes into $OUT (default bench/results/gpu-run), refreshed after every step so a run cut
# short still leaves what it measured: summary.md (every table with the command that produced
# it: paste it into bench/results/<card>.md), log.txt, all.tar.gz (every JSON, plot, markdown
# and log), and resnet18-fp32.json/.png, scaling.json, kernels.json when those steps ran.
#
# Needs python3 with a CUDA torch; no network and nothing to build: the package runs from this
# checkout, staged into a scratch folder with kernels/ as gradnorm_engine.kernels (the installed
# layout). Opacus is optional: carried in .gpu-deps/ (here: pip install --no-deps --target
# .gpu-deps opacus) it is measured, otherwise its row says it is not installed.
set -uo pipefail
cd "$(dirname "$0")/.."

PART=${1:-all}
case "$PART" in all|hooks|suite|tests|issue18) ;; *) echo "usage: bash bench/gpu_check.sh [all|hooks|suite|tests|issue18]" >&2; exit 2;; esac
PY=$(realpath -s "$(command -v "${PYTHON:-python3}")")  # absolute: step h5 runs elsewhere
DEVICE=${BENCH_DEVICE:-cuda}
OUT=${OUT:-bench/results/gpu-run}
WORK=$(mktemp -d)
STAGE=$(mktemp -d)
mkdir -p "$OUT"
LOG="$WORK/log.txt"
HOOKS_BUDGET_S=${BENCH_HOOKS_BUDGET_S:-290}   # hard cap for part 1
BUDGET_S=${BENCH_BUDGET_S:-330}               # hard cap for part 2
EXTRA=${BENCH_EXTRA_ARGS:-}                   # appended to every bench command

cp -r gradnorm_engine pyproject.toml tests "$STAGE/"
rm -rf "$STAGE/gradnorm_engine/kernels"
cp -r kernels "$STAGE/gradnorm_engine/kernels"
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu-deps ] && export PYTHONPATH="$PYTHONPATH:$(pwd)/.gpu-deps"
export MPLBACKEND=Agg PYTHONUNBUFFERED=1

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
  echo "# gpu_check.sh $PART $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "checkout: $(git rev-parse --short HEAD 2>/dev/null || echo 'no git metadata')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu \
    --format=csv 2>&1 || echo "nvidia-smi not available"
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 || true
  env -C "$STAGE" "$PY" -c "import gradnorm_engine.benchmark, gradnorm_engine.kernels; from gradnorm_engine.backends import BACKENDS; print('backends', list(BACKENDS))"
} 2>&1 | tee "$LOG"

SECTIONS=()   # names of the markdown sections, in order, for summary.md

save() {  # refresh $OUT: summary, log, the JSON/plots, everything as a tarball
  {
    echo "# Benchmark on $("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')" 2>/dev/null)"
    echo
    echo "Produced by \`bash bench/gpu_check.sh $PART\` ($(date -u '+%Y-%m-%d %H:%M UTC')); each section names its command."
    echo
    for name in "${SECTIONS[@]}"; do
      if [ -f "$WORK/$name.md" ]; then cat "$WORK/$name.md"; else echo "## $name: no result (see log.txt)"; echo; fi
    done
  } >"$WORK/summary.md"
  cp "$WORK/summary.md" "$LOG" "$OUT/"
  for f in resnet18-fp32.json resnet18-fp32.png scaling.json kernels.json g4-vit-b16-fp32.json g4-vit-b16-bf16.json \
           g4-bert-base-fp32.json g4-bert-base-bf16.json; do [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"; done
  tar czf "$OUT/all.tar.gz" -C "$WORK" . 2>/dev/null
}

limit_for() {  # limit_for LIMIT BUDGET START: the step's limit within what is left, or 0
  local left=$(($2 - (SECONDS - $3)))
  if [ "$left" -lt 20 ]; then echo 0; elif [ "$1" -gt "$left" ]; then echo "$left"; else echo "$1"; fi
}

script_step() {  # script_step NAME LIMIT TITLE COMMAND...: a script whose stdout is the section
  local name=$1 limit; limit=$(limit_for "$2" "$HOOKS_BUDGET_S" "$HSTART"); local title=$3; shift 3
  SECTIONS+=("$name")
  if [ "$limit" = 0 ]; then echo "== $name: skipped, the time budget is spent" | tee -a "$LOG"; save; return; fi
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  local t0=$SECONDS
  { echo "## $title"; echo; echo "Command: \`$*\`"; echo; echo '```'
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"; echo "exit ${PIPESTATUS[0]}"
    echo '```'; echo; } >"$WORK/$name.md"
  echo "== $name: $(grep "^exit " "$WORK/$name.md" | tail -n 1) after $((SECONDS - t0))s" | tee -a "$LOG"
  save
}

step() {  # step NAME LIMIT ARGS...: one bench invocation with its own time limit
  local name=$1 limit; limit=$(limit_for "$2" "$BUDGET_S" "$START"); shift 2
  SECTIONS+=("$name")
  if [ "$limit" = 0 ]; then echo "== $name: skipped, the time budget is spent" | tee -a "$LOG"; save; return; fi
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  local t0=$SECONDS
  # From the staged folder: "python -m" puts the working directory first on sys.path, and this
  # checkout's gradnorm_engine/ has no kernels/ inside.
  timeout --kill-after=10 "$limit" env -C "$STAGE" "$PY" -m gradnorm_engine.cli bench --device "$DEVICE" "$@" $EXTRA \
    --json "$WORK/$name.json" --markdown "$WORK/$name.md" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
  [ "$rc" -ne 0 ] && tail -n 20 "$LOG"
  save
}

if [ "$PART" = tests ]; then
  HSTART=$SECONDS
  script_step h5-cuda-tests 150 "CUDA tests (compiled kernels, hooks vs the per-sample loop)" \
    env -C "$STAGE" TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider --tb=short -rf tests/test_cuda.py
fi

if [ "$PART" = all ] || [ "$PART" = hooks ]; then
  HSTART=$SECONDS
  B=256; [ "${BENCH_SMOKE:-0}" = 1 ] && B=4
  script_step h1-hooks-fp32 50 "hooks vs a training step, fp32 (TF32 off), batch $B" \
    "$PY" bench/hooks_vs_training_step.py --device "$DEVICE" --batch $B --repeats 15
  script_step h2-hooks-bf16-cl 50 "hooks vs a training step, bf16 autocast + channels_last, batch $B" \
    "$PY" bench/hooks_vs_training_step.py --device "$DEVICE" --batch $B --repeats 15 --autocast bf16 --channels-last
  script_step h8-hooks-bf16-cl-1024 40 "hooks vs a training step, bf16 autocast + channels_last, batch $((4 * B)) (host overhead amortised?)" \
    "$PY" bench/hooks_vs_training_step.py --device "$DEVICE" --batch $((4 * B)) --repeats 9 --autocast bf16 --channels-last --loop-samples 0
  script_step h3-profile-fp32 45 "where the hooks time goes, fp32" \
    "$PY" bench/hooks_profile.py --device "$DEVICE" --batch $B
  script_step h4-profile-bf16-cl 45 "where the hooks time goes, bf16 + channels_last" \
    "$PY" bench/hooks_profile.py --device "$DEVICE" --batch $B --autocast bf16 --channels-last
  script_step h5-cuda-tests 100 "CUDA tests (compiled kernels, hooks vs the per-sample loop)" \
    env -C "$STAGE" TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider --tb=short -rf tests/test_cuda.py
  script_step h6-kernels 70 "Triton kernels vs torch references, Gram form, cuDNN batched weight gradient" \
    "$PY" bench/bench_kernels.py --json "$WORK/kernels.json"
  script_step h7-kernels-bf16-cl 40 "conv kernels in bf16 channels_last" \
    "$PY" bench/bench_kernels.py --kernels conv,bn --dtypes bf16 --channels-last --json "$WORK/kernels-bf16-cl.json"
  echo "== part hooks: $((SECONDS - HSTART))s" | tee -a "$LOG"
fi

if [ "$PART" = issue18 ]; then
  HSTART=$SECONDS; HOOKS_BUDGET_S=${BENCH_ISSUE18_BUDGET_S:-540}; START=$SECONDS; BUDGET_S=$HOOKS_BUDGET_S
  B=256; TB=64; P1M=100000,300000,1000000; TR="--repeats 8 --warmup 2 --loop-samples 4 --batches 2"
  if [ "${BENCH_SMOKE:-0}" = 1 ]; then B=4; TB=2; P1M=256,512; TR="--repeats 2 --warmup 1 --loop-samples 1 --batches 1"; fi
  script_step g1-hooks-fp32 50 "hooks vs a training step, fp32 (TF32 off), batch $B" \
    "$PY" bench/hooks_vs_training_step.py --device "$DEVICE" --batch $B --repeats 15
  script_step g1-hooks-bf16-cl 50 "hooks vs a training step, bf16 autocast + channels_last, batch $B" \
    "$PY" bench/hooks_vs_training_step.py --device "$DEVICE" --batch $B --repeats 15 --autocast bf16 --channels-last
  script_step g2-profile-fp32 45 "where the hooks time goes, fp32" "$PY" bench/hooks_profile.py --device "$DEVICE" --batch $B
  script_step g2-profile-bf16-cl 45 "where the hooks time goes, bf16 + channels_last" \
    "$PY" bench/hooks_profile.py --device "$DEVICE" --batch $B --autocast bf16 --channels-last
  script_step g3-cuda-tests 100 "CUDA tests (compiled kernels, hooks vs the per-sample loop)" \
    env -C "$STAGE" TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider --tb=short -rf tests/test_cuda.py
  for m in vit_b_16 bert_base; do
    for d in fp32 bf16; do
      name="g4-${m/_/-}-$d"; name=${name/vit-b_16/vit-b16}
      [ "${BENCH_SMOKE:-0}" = 1 ] && m_args="--model small_cnn" || m_args="--model $m"
      step "$name" 45 $m_args --dtype $d --batch-size $TB $TR --methods hooks,fwd_bwd,forward
    done
  done
  script_step g5-pool-1m 120 "a CIFAR-size pool ranked end to end, bf16 + channels_last (uint8 on the GPU)" \
    "$PY" bench/pool_1m.py --device "$DEVICE" --sizes $P1M --autocast bf16 --channels-last \
    $([ "${BENCH_SMOKE:-0}" = 1 ] && echo "--width 4 --batch 64")
  script_step g6-kernels 70 "Triton kernels vs torch references, Gram form, cuDNN batched weight gradient" \
    "$PY" bench/bench_kernels.py --json "$WORK/kernels.json"
  echo "== part issue18: $((SECONDS - HSTART))s" | tee -a "$LOG"
fi

if [ "$PART" = all ] || [ "$PART" = suite ]; then
  # Engine backends other than the per-sample loop: the chunk sweep times those.
  SWEEP=$(env -C "$STAGE" "$PY" -c "from gradnorm_engine.backends import BACKENDS; print(','.join(b for b in BACKENDS if b != 'loop'))")
  START=$SECONDS
  step resnet18-fp32 90 --model resnet18 --dtype fp32 $B256 $R18 --chunk-sizes $CHUNKS --chunk-backends "$SWEEP"
  step scaling 75 --no-methods --scaling $POOLS --scaling-model small_cnn --dtype fp32
  step resnet18-bf16 45 --model resnet18 --dtype bf16 $B256 $R18
  step resnet18-tf32 45 --model resnet18 --dtype tf32 $B256 $R18
  step mobilenet-fp32 50 --model mobilenet_v3_small --dtype fp32 $B128 $SMALL
  step transformer-fp32 45 --model transformer --dtype fp32 $B128 $SMALL
  step scaling-vmap 45 --no-methods --scaling $POOLS --scaling-model small_cnn --scaling-backend vmap --dtype fp32
  echo "== part suite: $((SECONDS - START))s" | tee -a "$LOG"
fi

save
rm -rf "$STAGE"
echo
cat "$OUT/summary.md"
