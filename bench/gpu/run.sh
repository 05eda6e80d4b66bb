#!/usr/bin/env bash
# On the offline GPU machine, from the repository root (bench/.gpu-kit carried along):
#
#   OUT=/path/to/out bash bench/gpu/run.sh
#
# Installs the kit's wheels that the machine lacks into $SITE (--no-deps: the machine's torch,
# transformers and accelerate stay), then runs bench/bench_train.py --device cuda on the two
# workloads of issue 14 (equal: 128-token prompts + 2 x 384-token responses; variable: prompts
# 32-512 and responses 32-1024 tokens), global batch 16, 2 warm-up + 8 measured steps, one run
# each row, every row under its own timeout. Tables on stdout and in $OUT/*.log, results in
# $OUT/*.json. Whole run: about 9 minutes on one H100/H200 (BUDGET_S caps it; rows run most
# telling first, so a cut drops the least telling).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
KIT=bench/.gpu-kit
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/midpo-site}
OUT=${OUT:-$PWD/runs/gpu-bench}
BUDGET_S=${BUDGET_S:-540}
START=$(date +%s)
rm -rf "$SITE"
mkdir -p "$OUT" "$SITE"
left() { echo $((START + BUDGET_S - $(date +%s))); }

# Only what the machine lacks (or has at another version, for the packages whose version the
# comparison depends on): its own numpy, pyarrow, fsspec ... stay as they are.
wheels=$(env -u PYTHONPATH "$PY" - "$KIT"/wheels/*.whl <<'EOF'
import importlib.metadata as md
import sys

exact = {"deepspeed", "trl", "pydantic", "pydantic-core", "datasets"}
for wheel in sys.argv[1:]:
    name, version = wheel.rsplit("/", 1)[-1].split("-")[:2]
    dist = name.replace("_", "-").lower()
    try:
        have = md.version(dist)
    except md.PackageNotFoundError:
        have = None
    if have is None or (dist in exact and have != version):
        print(wheel)
EOF
)
echo "[gpu] installing: $(echo $wheels | xargs -n1 basename 2>/dev/null | tr '\n' ' ')"
PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --quiet --no-index --no-deps --no-compile \
    --target "$SITE" $wheels || exit 1
export PYTHONPATH="$SITE:$PWD"
export MIDPO_BENCH_SITE="$SITE"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cuda
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-lo}" GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
export TRITON_CACHE_DIR=/tmp/midpo-triton TORCH_EXTENSIONS_DIR=/tmp/midpo-torch-ext
rows_equal=("TRL" "ours default" "compiled" "logits kept" "flex" "profile")
rows_variable=("TRL" "ours default, precomputed" "compiled" "ours default, live ref" "flex packed")
# Triton (TRL's fused log-probs, flex attention, compiled blocks) compiles with a C compiler at first use.
if [ -z "${CC:-}" ] && ! command -v gcc >/dev/null && ! command -v cc >/dev/null; then
    echo "[gpu] no C compiler: TRL on its PyTorch log-prob path, no flex attention or compiled rows"
    export MIDPO_BENCH_TRL_TRITON=0
    rows_equal=("TRL" "ours default" "logits kept" "profile")
    rows_variable=("TRL" "ours default, precomputed" "ours default, live ref")
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
"$PY" -c 'import torch, transformers, deepspeed, trl; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "deepspeed", deepspeed.__version__, "trl", trl.__version__)' 2>&1 | tail -n 3 | tee -a "$OUT/device.txt"
common=(--device cuda --model "$KIT/model" --batch 16 --warmup 2 --steps 8 --repeats 1 --row-timeout 150)
timeout $(($(left) * 7 / 10)) "$PY" bench/bench_train.py "${common[@]}" --workload equal \
    --prompt 128 --response 384 --rows "${rows_equal[@]}" --out "$OUT/equal.json" 2>&1 |
    tee "$OUT/equal.log"
pkill -9 -f "bench_train.py --worker" || true  # a row the workload's timeout cut short
timeout $(($(left) - 10)) "$PY" bench/bench_train.py "${common[@]}" --workload variable \
    --rows "${rows_variable[@]}" --out "$OUT/variable.json" 2>&1 | tee "$OUT/variable.log"
pkill -9 -f "bench_train.py --worker" || true
echo "[gpu] done in $(($(date +%s) - START)) s"
