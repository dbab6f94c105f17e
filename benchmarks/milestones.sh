#!/usr/bin/env bash
# The "every milestone on the same workload" table of docs/benchmarks.md, re-run with today's code
# in one call on a lent GPU machine. Two halves, each well inside a 10-minute command:
#   bash benchmarks/milestones.sh scaled   # HF, m1 .. m5 (TP=1) at --scale 0.25, max_model_len 2048
#   bash benchmarks/milestones.sh full     # m3, m4, m5 (TP=1) on the full workload, then m4 again
# JSON lines go to stdout and, when $OUT is set (the device tool), to $OUT/milestones_<half>.jsonl.
set -uo pipefail
half=${1:?usage: bash benchmarks/milestones.sh scaled|full}
# Wheels the device lacks (xxhash, ...), carried in .whl/ as for benchmarks/gpu_session.sh.
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=/tmp/site:$PWD || exit
fi
export PYTHONUNBUFFERED=1 FOLOVLLM_CACHE=${FOLOVLLM_CACHE:-/tmp/folovllm-cache}
log=${OUT:-/tmp}/milestones_${half}.jsonl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
bench() { python3 -m benchmarks.throughput --preset qwen3-0.6b "$@" | tee -a "$log"; }
case $half in
scaled)  # m2's contiguous slots must fit: 256 x the checkpoint's 40,960 tokens would not
    small='{"max_model_len": 2048}'
    bench --milestone hf --scale 0.25 --hf-batch-size 64
    for m in m1_sampling m2_kvcache m3_paged m4_cudagraph m5_tp; do
        bench --milestone $m --scale 0.25 --llm-kwargs "$small"
    done ;;
full)  # m4 twice: the first process on a fresh machine also pays for loading kernels
    for m in m3_paged m4_cudagraph m5_tp m4_cudagraph; do bench --milestone $m; done ;;
*) echo "unknown half: $half (scaled or full)" >&2; exit 2 ;;
esac
