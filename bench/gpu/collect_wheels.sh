#!/usr/bin/env bash
# Collect what bench/bench_train.py --device cuda needs on an offline GPU machine into
# bench/.gpu-kit/ (git-ignored): Python 3.12 manylinux wheels of the packages such a machine
# lacks (its torch, transformers and accelerate are used as they are) and the SmolLM2-135M
# config and tokenizer (the bench random-initialises the weights, seed 0).
#
#   make gpu-kit            (or: bash bench/gpu/collect_wheels.sh)
#
# Then carry bench/.gpu-kit to the GPU machine with the checkout and run bench/gpu/run.sh there
# (docs/training.md has the exact command).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
KIT=bench/.gpu-kit
PY=${PY:-.venv/bin/python}
mkdir -p "$KIT/wheels" "$KIT/model"
pins() { "$PY" -c 'import importlib.metadata as m, sys; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' "$@"; }
# Binary wheels for CPython 3.12 on manylinux x86-64, pinned to this venv's versions (tested
# together), plus TRL (the comparison) at the issue's version.
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$KIT/wheels" \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any \
    $(pins pydantic pydantic_core annotated-types typing-inspection datasets dill multiprocess \
        hjson einops fsspec xxhash) trl==1.16.0
# DeepSpeed publishes only a source archive: build its pure-Python wheel (ops JIT-built there).
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$KIT/wheels" "$(pins deepspeed)"
MODEL=$("$PY" -c 'from pathlib import Path; from pipeline.models import SMOLLM2, convert_smollm2
print(convert_smollm2(Path("runs/_cache/models") / SMOLLM2))')
for f in config.json generation_config.json tokenizer.json tokenizer_config.json \
    special_tokens_map.json chat_template.jinja; do
    if [ -f "$MODEL/$f" ]; then cp "$MODEL/$f" "$KIT/model/"; fi
done
ls -1 "$KIT/wheels" "$KIT/model"
echo "kit ready in $KIT ($(du -sh "$KIT" | cut -f1))"
