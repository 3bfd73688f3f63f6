#!/usr/bin/env bash
# The hooks backend against a training step of the same model, one row per benchmark workload
# (the CPU targets of bench/results/transformers-cpu.md: each >= 0.9x), printed as markdown:
#
#   bash bench/hooks_rows.sh [ENGINE_CHECKOUT] > rows.md
#
# ENGINE_CHECKOUT (default: this checkout) is the source tree whose gradnorm_engine is measured,
# so that an older commit can be timed by the same script (a worktree of it:
# `git worktree add --detach /tmp/before <commit>`). THREADS (default 2), REPEATS (default 9).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
engine="$(cd "${1:-$here/..}" && pwd)"
threads="${THREADS:-2}"
repeats="${REPEATS:-9}"
python="${PYTHON:-python}"
echo "engine: $engine ($(git -C "$engine" rev-parse --short HEAD 2>/dev/null || echo '?'))"
echo
# model:batch (ResNet-50 at batch 8, as first measured; the rest at 32)
for row in vit:32 swin_t:32 convnext_tiny:32 resnet50:8 bert:32 cifar_resnet18:32; do
  model="${row%%:*}"; batch="${row##*:}"
  PYTHONPATH="$engine:$here" "$python" "$here/hooks_vs_training_step.py" --model "$model" --batch "$batch" \
    --threads "$threads" --repeats "$repeats" --loop-samples 0
  echo
done
