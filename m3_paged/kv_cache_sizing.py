"""How many KV-cache blocks fit: bytes per block, and the budget on a GPU or a CPU.

bytes per block = 2 (K and V) * num_layers * block_size * num_kv_heads * head_dim * dtype size.
On CUDA the budget is `gpu_memory_utilization` of the device memory minus what everything else
needs at its peak (measured by a profiling forward pass of the largest batch); on a CPU it is a
byte budget (`kv_cache_memory_bytes`, default: enough for max_num_seqs full-length sequences,
capped at 1 GiB). `num_gpu_blocks_override` beats both.
"""

from __future__ import annotations

import torch

from m0_config.config import EngineConfig

CPU_DEFAULT_BUDGET = 1 << 30


def block_bytes(config: EngineConfig) -> int:
    return config.cache_config.block_size * config.model_config.kv_cache_bytes_per_token()


def cuda_budget(config: EngineConfig, device: torch.device) -> int:
    """gpu_memory_utilization * total - (memory used by others now + this process's peak - current):
    call after the profiling run, with the peak statistics it produced."""
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    peak, current = torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
    return int(total * config.cache_config.gpu_memory_utilization - used - peak + current)


def cpu_budget(config: EngineConfig) -> int:
    cc, mc = config.cache_config, config.model_config
    if cc.kv_cache_memory_bytes is not None:
        return cc.kv_cache_memory_bytes
    full = config.scheduler_config.max_num_seqs * mc.max_model_len * mc.kv_cache_bytes_per_token()
    return min(full, CPU_DEFAULT_BUDGET)


def num_blocks_for(config: EngineConfig, budget_bytes: int, bytes_per_block: int | None = None) -> int:
    """`budget_bytes // bytes_per_block` (default: `block_bytes(config)`), unless an override says otherwise."""
    cc = config.cache_config
    if cc.num_gpu_blocks_override is not None:
        return cc.num_gpu_blocks_override
    if cc.kv_cache_memory_bytes is not None:
        budget_bytes = cc.kv_cache_memory_bytes
    bytes_per_block = bytes_per_block or block_bytes(config)
    num_blocks = budget_bytes // bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"no memory left for a single KV-cache block ({bytes_per_block} bytes; budget {budget_bytes} "
            "bytes): raise gpu_memory_utilization / kv_cache_memory_bytes, or use a smaller model or dtype"
        )
    return int(num_blocks)
