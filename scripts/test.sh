#!/usr/bin/env bash
# The test suite (CPU; Triton kernels run under the interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
exec ${PYTHON:-python3} -m pytest -q -p no:cacheprovider "$@"
