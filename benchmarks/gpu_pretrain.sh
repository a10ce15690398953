#!/usr/bin/env bash
# Pre-training samples/s and MFU on a lent GPU machine (one H200): r101-l12, 600x1000, bf16.
# Writes $OUT/gpu_pretrain.json (or ./gpu_pretrain.json). Extra arguments go to gpu_pretrain.py,
# e.g. `bash benchmarks/gpu_pretrain.sh --steps 10 --micro-batch 8`.
# DeepSpeed and mosaicml-streaming are optional: their modes are skipped when not importable.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT_FILE="${OUT:-.}/gpu_pretrain.json"
mkdir -p "$(dirname "$OUT_FILE")"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader >&2 || true
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" >&2
exec "$PYTHON" benchmarks/gpu_pretrain.py --out "$OUT_FILE" "$@"
