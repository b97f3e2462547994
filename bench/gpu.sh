#!/usr/bin/env bash
# Everything to measure when a GPU is lent, in one go, into one markdown report:
#   bench/gpu.sh [REPORT.md]          (default var/gpu-report.md; paste it into docs/serving.md)
#   bench/gpu.sh --dry-run            (print the steps without running them: checks the script on a CPU machine)
# Steps: the CUDA tests; the serving benchmark on CUDA (fp16, ViT-B-16: bare encoder batch sweep, HTTP against the
# bare encoder); TGP-T's training-step peak memory against CoOp's. Run from the repository root with the project's
# virtualenv (PYTHON=... to use another interpreter). A step that fails is reported as failed and the rest still run.
set -uo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
REPORT=${1:-var/gpu-report.md}

STEPS=(
  "CUDA tests|$PYTHON -m pytest -q -rs -p no:cacheprovider tests/service/core"
  "Serving benchmark, ViT-B-16 fp16 on CUDA|$PYTHON bench/serving.py --model ViT-B-16 --device cuda --batch 64 --batch-sweep 1,8,32,128,256 --clients 32 --no-peers"
  "TGP-T against CoOp, training-step peak memory|$PYTHON bench/train_memory.py --model ViT-B-16 --pretrained '' --classes 10 100 1000 --category-queries 32 --content-queries 64"
)

if [[ $DRY == 1 ]]; then
  for step in "${STEPS[@]}"; do echo "${step%%|*}: ${step#*|}"; done
  exit 0
fi

mkdir -p "$(dirname "$REPORT")"
{
  echo "# GPU report ($(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1
  echo '```'
} > "$REPORT"

failed=0
for step in "${STEPS[@]}"; do
  title=${step%%|*}
  command=${step#*|}
  echo "== $title: $command" >&2
  start=$(date +%s)
  output=$(bash -c "$command" 2>&1)
  status=$?
  [[ $status == 0 ]] || failed=1
  {
    echo
    echo "## $title"
    echo
    echo '```'
    echo "$command    # exit $status, $(( $(date +%s) - start )) s"
    echo '```'
    echo
    # markdown tables as they are, the rest (progress, logs) fenced
    echo "$output" | grep -E '^\|' || true
    echo
    echo '<details><summary>full output</summary>'
    echo
    echo '```'
    echo "$output" | grep -vE '^\|' | tail -n 200
    echo '```'
    echo '</details>'
  } >> "$REPORT"
done
echo "report: $REPORT" >&2
exit $failed
