"""midpo: MI-DPO alignment pipeline (library). Stages live in ``stages/``."""

import os

__version__ = "0.1.0"

# Offline by default: no model hub, no dataset hub, no telemetry. A user who wants the hub sets
# HF_HUB_OFFLINE=0 explicitly. DeepSpeed picks the CPU accelerator unless told otherwise
# (on GPU clusters set DS_ACCELERATOR=cuda or leave it unset in the job environment).
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)
