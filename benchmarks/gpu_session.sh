#!/usr/bin/env bash
# What we run on a lent GPU machine (see docs/benchmarks.md): install carried wheels, then the
# GPU-marked tests. Usage on the device: bash benchmarks/gpu_session.sh [pytest args...]
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export FOLOVLLM_CACHE=/tmp/folovllm-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -p no:cacheprovider -q -m gpu "$@"
