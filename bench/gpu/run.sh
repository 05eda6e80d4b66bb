#!/usr/bin/env bash
# On the offline GPU machine, from the repository root (bench/.gpu-kit carried along):
#
#   OUT=/path/to/out bash bench/gpu/run.sh
#
# Installs the kit's wheels into $SITE (only into that folder, --no-deps: the machine's torch,
# transformers and accelerate stay), then runs bench/bench_train.py --device cuda on the two
# workloads of issue 14 (equal: 128-token prompts + 2 x 384-token responses; variable: prompts
# 32-512 and responses 32-1024 tokens), global batch 16, 2 warm-up + 8 measured steps, one run
# each. Tables on stdout and in $OUT/*.log, results in $OUT/*.json.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
KIT=bench/.gpu-kit
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/midpo-site}
OUT=${OUT:-$PWD/runs/gpu-bench}
mkdir -p "$OUT" "$SITE"
PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --quiet --no-index --no-deps --no-compile \
    --target "$SITE" "$KIT"/wheels/*.whl || exit 1
export PYTHONPATH="$SITE:$PWD"
export MIDPO_BENCH_SITE="$SITE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
"$PY" -c 'import torch, transformers, deepspeed, trl; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "deepspeed", deepspeed.__version__, "trl", trl.__version__)' | tee -a "$OUT/device.txt"
common=(--device cuda --model "$KIT/model" --batch 16 --warmup 2 --steps 8 --repeats 1)
timeout 280 "$PY" bench/bench_train.py "${common[@]}" --workload equal --prompt 128 \
    --response 384 --out "$OUT/equal.json" 2>&1 | tee "$OUT/equal.log"
timeout 280 "$PY" bench/bench_train.py "${common[@]}" --workload variable \
    --out "$OUT/variable.json" 2>&1 | tee "$OUT/variable.log"
