#!/usr/bin/env bash
# The TP=2 throughput run on 2 GPUs that "hung": check the fix and leave evidence either way, in one
# short device run (see docs/benchmarks.md, "m5 tensor parallelism on GPUs").
#
#   bash benchmarks/tp_hang_probe.sh [scale]        # on nvidia-h200-x2, carrying .whl; scale 0.25
#
# Diagnosis (from reading NCCL and the engine): the run did not hang in a step but at its end.
# benchmarks/throughput.py drops its LLM without shutdown(); the executor's finalizer then shut the
# NCCL communicator down while rank 0's model runner, and the decode CUDA graphs in it, were still
# alive (a weakref finalizer runs before the object's attributes are cleared); and from NCCL 2.26
# on, finalizing (even aborting) a communicator waits until every graph that captured one of its
# collectives is destroyed: forever. The JSON line is printed after that, so nothing showed.
# `pytest -m gpu` passed because `with LLM(...)` calls shutdown(), which dropped rank 0's runner
# first. The fix: every rank releases its graphs before its communicator
# (m5_tp/model_runner.py::ModelRunner.release_cudagraphs, m5_tp/executor.py::stop_workers).
#
# 1. the machine: GPUs, how they are linked, NCCL version, peer access;
# 2. NCCL + CUDA graphs without the engine: `benchmarks/tp_scaling.py --check` replays the engine's
#    collectives (per bucket, largest first, one pool: 57 all-reduces and the logits gather at
#    Qwen3-0.6B's shapes) mixed with eager steps, checking every sum; NCCL_DEBUG=INFO shows the
#    transport (P2P / SHM / ...);
# 3. the command that hung, `python -m benchmarks.throughput ...` at TP=2: it must print its JSON
#    line now;
# 4. the confirmation: the same engine dropped in the old order (graphs still alive when the
#    communicator is shut down) must hang, rank 0's stack dump showing stop_workers -> shutdown
#    (TP_PROBE_CONFIRM=0 skips it);
# 5. only if 3 failed: a traced run (every rank prints each step it enqueues, and the end is timed),
#    then the same with enforce_eager=True, to find where it stops instead.
#    TP_PROBE_EXTRA='{"tensor_parallel_size": 2, ...}' adds one more traced variant.
#
# FOLOVLLM_HANG_DUMP_S is set throughout: a process that goes that long without starting a step
# writes all its threads' Python stacks to stderr, and again after each further period (driver in
# the sampler's .tolist(): waiting on its GPU; worker in run_loop: waiting for the driver).
# Full logs go to $OUT (the device tool brings them back) or /tmp/tp_probe; what is printed is a
# digest. About 3-4 minutes when the fix holds, at most about 8.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD
export FOLOVLLM_CACHE=/tmp/folovllm-cache PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
export NCCL_DEBUG=WARN TORCH_NCCL_ASYNC_ERROR_HANDLING=1 FOLOVLLM_HANG_DUMP_S=${FOLOVLLM_HANG_DUMP_S:-20}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # multicast stays off
SCALE=${1:-0.25}
LOG=${OUT:-/tmp/tp_probe}
HOOKS=$(mktemp -d /tmp/tp_probe_hooks.XXXX)
mkdir -p "$LOG"

# ---- Python for steps 4 and 5, written here: the repo keeps no debug code --------------------------
cat >"$HOOKS/tp_probe_hooks.py" <<'EOF'
"""Installed on every rank through collective_rpc: print each step as it is enqueued."""
import sys
import time


def install(worker):
    runner, count = worker.model_runner, [0]
    inner = runner.execute_model

    def traced(so):
        k, start = count[0], time.perf_counter()
        count[0] += 1
        bucket = runner.decode_bucket(so)
        kind = "eager or mixed" if bucket is None else f"decode graph {bucket}"
        print(f"[rank {worker.rank}] step {k} begin: {len(so.seqs)} seqs, {sum(so.num_scheduled_tokens)} "
              f"tokens, {kind}", file=sys.stderr, flush=True)
        out = inner(so)
        print(f"[rank {worker.rank}] step {k} enqueued in {1e3 * (time.perf_counter() - start):.1f} ms",
              file=sys.stderr, flush=True)
        return out

    runner.execute_model = traced
    return worker.rank
EOF
cat >"$HOOKS/tp_probe_driver.py" <<'EOF'
"""benchmarks/throughput.py's run_engine, with per-step traces on every rank and a timed end."""
import gc
import json
import sys
import time

import tp_probe_hooks
from transformers import AutoConfig

from benchmarks.throughput import _sync, make_workload
from m0_config.sampling_params import SamplingParams
from m0_config.toy import toy_checkpoint
from m5_tp import LLM


def say(msg):
    print(f"[probe {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main():
    scale, kwargs = float(sys.argv[1]), json.loads(sys.argv[2])
    model = toy_checkpoint("qwen3", preset="qwen3-0.6b", dtype="bfloat16")
    prompts, params = make_workload(scale, AutoConfig.from_pretrained(model).vocab_size)
    start = time.perf_counter()
    llm = LLM(model, **kwargs)
    say(f"engine started in {time.perf_counter() - start:.1f} s; traced ranks {llm.collective_rpc(tp_probe_hooks.install)}")
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)
    _sync()
    say("warm-up request done")
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    _sync()
    seconds = time.perf_counter() - start
    tokens = sum(sp.max_tokens for sp in params)
    print(json.dumps({"probe": "engine", "llm_kwargs": kwargs, "scale": scale, "requests": len(prompts),
                      "output_tokens": tokens, "seconds": round(seconds, 3),
                      "tokens_per_s": round(tokens / seconds, 1)}), flush=True)
    start = time.perf_counter()
    del llm  # as benchmarks/throughput.py does: no shutdown(), the finalizer stops the workers
    gc.collect()
    say(f"engine dropped (workers stopped, communicators closed) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
EOF
cat >"$HOOKS/tp_probe_confirm.py" <<'EOF'
"""The old order: rank 0's communicator shut down while its CUDA graphs are alive. Must hang."""
import gc
import sys
import time

from m0_config.sampling_params import SamplingParams
from m0_config.toy import toy_checkpoint
from m5_tp import LLM


def main():
    llm = LLM(toy_checkpoint("qwen3", preset="qwen3-0.6b", dtype="bfloat16"), tensor_parallel_size=2)
    llm.generate(["Benchmark: "], SamplingParams(max_tokens=8), use_tqdm=False)
    llm.llm_engine.model_runner.handles.driver_runner = None  # stop_workers no longer releases them
    print("[confirm] dropping the engine with rank 0's graphs alive", file=sys.stderr, flush=True)
    start = time.perf_counter()
    del llm
    gc.collect()
    print(f"[confirm] NO HANG: dropped in {time.perf_counter() - start:.1f} s; the cause is elsewhere", flush=True)


if __name__ == "__main__":
    main()
EOF

run_engine() {  # name, llm kwargs (JSON), timeout (s); returns the run's exit code (124: timed out)
  local name=$1 kwargs=$2 limit=$3 log="$LOG/engine_$1.log"
  echo "== traced engine, $name: $kwargs, scale $SCALE, timeout ${limit} s"
  PYTHONPATH="$HOOKS:$PYTHONPATH" timeout -k 10 "$limit" python3 "$HOOKS/tp_probe_driver.py" "$SCALE" "$kwargs" >"$log" 2>&1
  local rc=$?
  echo "-- exit code $rc$([ $rc = 124 ] && echo ' (timed out: still running when stopped)'); full log: $log"
  echo "-- everything but the step traces (start-up, stack dumps, errors, result), last 120 lines:"
  grep -vE '^\[rank [0-9]+\] step|^\s*$' "$log" | tail -120
  for r in 0 1; do
    echo "-- rank $r: $(grep -c "^\[rank $r\] step .* begin" "$log") steps begun; the last 4 trace lines:"
    grep -E "^\[rank $r\] step" "$log" | tail -4
  done
  return $rc
}

# ---- 1. the machine ----------------------------------------------------------------------------
echo "== machine"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
nvidia-smi topo -m 2>&1 | head -8
python3 - <<'EOF'
import torch
n = torch.cuda.device_count()
print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version(), "gpus", n)
if n >= 2:
    print("peer access 0->1:", torch.cuda.can_device_access_peer(0, 1), "1->0:", torch.cuda.can_device_access_peer(1, 0))
EOF
python3 -c "from m0_config.toy import toy_checkpoint; print('checkpoint', toy_checkpoint('qwen3', preset='qwen3-0.6b', dtype='bfloat16'))"

# ---- 2. NCCL + CUDA graphs alone -------------------------------------------------------------------
echo "== NCCL + CUDA graphs without the engine (Qwen3-0.6B shapes, 20 buckets, 300 steps)"
NCCL_DEBUG=INFO timeout -k 10 90 python3 -m benchmarks.tp_scaling --check --preset qwen3-0.6b >"$LOG/check.log" 2>&1
rc=$?
echo "-- exit code $rc; full log: $LOG/check.log"
grep -E 'NCCL version|via |"benchmark"' "$LOG/check.log" | sed -E 's/^[^ ]+ [^ ]+ //' | sort -u | head -16
[ $rc = 0 ] || grep -vE 'NCCL INFO' "$LOG/check.log" | tail -80

# ---- 3. the command that hung ------------------------------------------------------------------
echo "== python -m benchmarks.throughput --milestone m5_tp --preset qwen3-0.6b --scale $SCALE, TP=2"
timeout -k 10 150 python3 -m benchmarks.throughput --milestone m5_tp --preset qwen3-0.6b --scale "$SCALE" \
  --llm-kwargs '{"tensor_parallel_size": 2}' >"$LOG/throughput.log" 2>&1
bench=$?
echo "-- exit code $bench$([ $bench = 124 ] && echo ' (timed out)'); full log: $LOG/throughput.log"
grep -vE '^\s*$' "$LOG/throughput.log" | tail -60

if [ $bench = 0 ]; then
  # ---- 4. the diagnosis, confirmed by undoing the fix in-process ------------------------------------
  if [ "${TP_PROBE_CONFIRM:-1}" != 0 ]; then
    echo "== confirmation: the old order (communicator shut down under live graphs) should hang"
    timeout -k 5 90 python3 "$HOOKS/tp_probe_confirm.py" >"$LOG/confirm.log" 2>&1
    rc=$?
    echo "-- exit code $rc$([ $rc = 124 ] && echo ' (timed out: it hung, as expected)'); full log: $LOG/confirm.log"
    grep -vE '^\s*$|INFO' "$LOG/confirm.log" | tail -45
  fi
else
  # ---- 5. where does it stop, then? ---------------------------------------------------------------
  if ! run_engine graphs '{"tensor_parallel_size": 2}' 120; then
    run_engine eager '{"tensor_parallel_size": 2, "enforce_eager": true}' 100
  fi
fi
if [ -n "${TP_PROBE_EXTRA:-}" ]; then run_engine extra "$TP_PROBE_EXTRA" 100; fi
echo "== GPUs after the runs (no process should hold memory)"
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader
rm -rf "$HOOKS"
