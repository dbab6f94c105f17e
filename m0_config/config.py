"""Engine configuration: one dataclass per concern, composed and cross-checked by `EngineConfig`.

`ModelConfig` knows the checkpoint, `CacheConfig` the KV cache, `SchedulerConfig` the batching
limits and `ParallelConfig` the process layout. Each validates its own fields in `__post_init__`;
`EngineConfig.__post_init__` fills derived values (a `None` in one config taken from another) and
checks the rules that span several configs. `EngineConfig.from_llm_kwargs` maps the keyword
arguments of `LLM(...)` onto the four configs.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

# The architectures (config.json "architectures") that every milestone's model code supports.
SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3MoeForCausalLM")

ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash_attn")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_ALIASES = {
    "float": "float32",
    "half": "float16",
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def read_checkpoint_config(model: str) -> dict:
    """config.json of a checkpoint folder as a dict, with a clear error for what is missing."""
    _check(isinstance(model, (str, os.PathLike)), f"model must be a folder path, got {type(model).__name__}")
    path = os.fspath(model)
    if not os.path.isdir(path):
        raise ValueError(
            f"model folder {path!r} does not exist. Pass a local Hugging Face checkpoint folder "
            "(config.json, *.safetensors, tokenizer files); FoloVLLM never downloads models."
        )
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"model folder {path!r} has no config.json, so it is not a Hugging Face checkpoint")
    with open(config_file) as f:
        return json.load(f)


def check_architecture(raw_config: dict, supported: tuple[str, ...] = SUPPORTED_ARCHITECTURES) -> str:
    """The checkpoint's architecture name, or a ValueError that lists the supported ones."""
    archs = raw_config.get("architectures") or []
    for arch in archs:
        if arch in supported:
            return arch
    raise ValueError(
        f"unsupported architecture {archs or '(none given in config.json)'}; "
        f"supported architectures: {', '.join(supported)}"
    )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` picks CUDA when there is a GPU, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    _check(dev.type in ("cpu", "cuda"), f"device must be 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA GPU is visible")
    return dev


def chunked_token_budget(device: torch.device) -> int:
    """The default `max_num_batched_tokens` with chunked prefill: vLLM's for offline use (`LLM`),
    16,384 tokens on a GPU with >= 70 GiB and 8,192 on a smaller one (prefill is compute-bound, and
    bigger chunks take the prompts in fewer, fuller steps: on an H100 the throughput benchmark ran at
    15.7k / 16.8k / 17.4k tok/s with 4,096 / 8,192 / 16,384); 2,048 on a CPU, where steps are slow
    and the tests stay small."""
    if device.type != "cuda":
        return 2048
    return 16384 if torch.cuda.get_device_properties(device).total_memory >= 70 * 2**30 else 8192


def resolve_dtype(dtype: str | torch.dtype, raw_config: dict, device: torch.device) -> torch.dtype:
    """`auto`: the checkpoint's dtype on a GPU (float32 checkpoints run in bfloat16 there), and
    float32 on the CPU, where half precision is slow and float32 is the correctness reference."""
    if isinstance(dtype, torch.dtype):
        _check(dtype in _DTYPES.values(), f"dtype must be one of {list(_DTYPES)}, got {dtype}")
        return dtype
    name = _DTYPE_ALIASES.get(dtype, dtype)
    _check(
        name == "auto" or name in _DTYPES, f"dtype must be 'auto' or one of {list(_DTYPES)}, got {dtype!r}"
    )
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    # Newer transformers write "dtype", older ones "torch_dtype".
    ckpt = raw_config.get("dtype") or raw_config.get("torch_dtype") or "bfloat16"
    ckpt_dtype = _DTYPES.get(ckpt, torch.bfloat16)
    if ckpt_dtype == torch.float32:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return ckpt_dtype


@dataclass
class ModelConfig:
    """The checkpoint: where it is, which architecture, in which dtype, how long a sequence may be."""

    model: str
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    seed: int = 0
    max_model_len: int | None = None
    device: str | torch.device | None = None
    attention_backend: str = "auto"  # m3 on: "auto", "torch", "triton" or "flash_attn"
    # Derived in __post_init__.
    architecture: str = field(init=False)
    hf_config: Any = field(init=False, repr=False)
    torch_dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.model, (str, os.PathLike)):
            self.model = os.path.expanduser(os.fspath(self.model))  # "~/models/Qwen3-0.6B" works too
        if isinstance(self.tokenizer, (str, os.PathLike)):
            self.tokenizer = os.path.expanduser(os.fspath(self.tokenizer))
        raw = read_checkpoint_config(self.model)
        self.architecture = check_architecture(raw)
        self.tokenizer = self.tokenizer or self.model
        _check(os.path.isdir(self.tokenizer), f"tokenizer folder {self.tokenizer!r} does not exist")
        _check(isinstance(self.seed, int), f"seed must be an int, got {self.seed!r}")
        _check(
            self.attention_backend in ATTENTION_BACKENDS,
            f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}",
        )
        self.device = resolve_device(self.device)
        self.torch_dtype = resolve_dtype(self.dtype, raw, self.device)
        from transformers import AutoConfig

        self.hf_config = AutoConfig.from_pretrained(self.model)
        self.max_model_len = self._resolve_max_model_len()

    def _resolve_max_model_len(self) -> int:
        limit = getattr(self.hf_config, "max_position_embeddings", None)
        if self.max_model_len is None:
            _check(limit is not None, "config.json has no max_position_embeddings; pass max_model_len")
            return int(limit)
        _check(
            isinstance(self.max_model_len, int) and self.max_model_len > 0,
            f"max_model_len must be a positive int, got {self.max_model_len!r}",
        )
        if limit is not None and self.max_model_len > limit:
            raise ValueError(
                f"max_model_len={self.max_model_len} is larger than the checkpoint's "
                f"max_position_embeddings={limit}; allowed: 1..{limit}"
            )
        return self.max_model_len

    # Shape facts every later milestone needs (KV-cache sizing, attention).
    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_attention_heads(self) -> int:
        return self.hf_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return (
            getattr(self.hf_config, "head_dim", None)
            or self.hf_config.hidden_size // self.num_attention_heads
        )

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    def kv_cache_bytes_per_token(self) -> int:
        """2 (K and V) * layers * kv_heads * head_dim * bytes per element."""
        elem = torch.tensor([], dtype=self.torch_dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


@dataclass
class CacheConfig:
    """The KV cache: block size, how much device memory it may take, prefix caching."""

    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_bytes: int | None = None  # a byte budget; the CPU's way to size the cache
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        bs = self.block_size
        _check(
            isinstance(bs, int) and bs > 0 and bs & (bs - 1) == 0 and bs <= 1024,
            f"block_size must be a power of two in 1..1024, got {bs!r}",
        )
        _check(
            isinstance(self.gpu_memory_utilization, (int, float))
            and 0.0 < self.gpu_memory_utilization <= 1.0,
            f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}",
        )
        for name in ("num_gpu_blocks_override", "kv_cache_memory_bytes"):
            value = getattr(self, name)
            _check(
                value is None or (isinstance(value, int) and value > 0),
                f"{name} must be a positive int or None",
            )
        _check(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching must be a bool")


@dataclass
class SchedulerConfig:
    """Batching limits: how many sequences and tokens one engine step may hold."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None  # synced from ModelConfig by EngineConfig
    enable_chunked_prefill: bool = True
    # m4 on: schedule step n+1 while the GPU still runs step n. None = on with CUDA graphs on a GPU.
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        _check(
            isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1,
            f"max_num_seqs must be an int >= 1, got {self.max_num_seqs!r}",
        )
        n = self.max_num_batched_tokens
        _check(
            n is None or (isinstance(n, int) and n >= 1),
            f"max_num_batched_tokens must be an int >= 1, got {n!r}",
        )
        _check(isinstance(self.enable_chunked_prefill, bool), "enable_chunked_prefill must be a bool")
        _check(
            self.async_scheduling is None or isinstance(self.async_scheduling, bool),
            f"async_scheduling must be None (automatic), True or False, got {self.async_scheduling!r}",
        )


@dataclass
class ParallelConfig:
    """How the model is split over processes. Only tensor parallelism is implemented (m5_tp)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_backend: str | None = None  # None: "nccl" on CUDA, "gloo" on CPU

    def __post_init__(self) -> None:
        tp = self.tensor_parallel_size
        _check(isinstance(tp, int) and tp >= 1, f"tensor_parallel_size must be an int >= 1, got {tp!r}")
        _check(
            self.pipeline_parallel_size == 1,
            "pipeline_parallel_size must be 1: pipeline parallelism is not built",
        )
        _check(
            self.data_parallel_size == 1, "data_parallel_size must be 1: run one engine per replica instead"
        )
        _check(
            self.distributed_backend in (None, "nccl", "gloo"),
            f"distributed_backend must be 'nccl', 'gloo' or None, got {self.distributed_backend!r}",
        )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size


@dataclass
class EngineConfig:
    """All of the engine's configuration. `__post_init__` syncs derived values and cross-checks."""

    model_config: ModelConfig
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        self._sync()
        self._cross_check()

    def _sync(self) -> None:
        model, sched, par = self.model_config, self.scheduler_config, self.parallel_config
        if sched.max_model_len is None:
            sched.max_model_len = model.max_model_len
        if sched.max_num_batched_tokens is None:
            # Without chunking a whole prompt must fit in one step; with it, a fixed budget suffices.
            floor = (
                chunked_token_budget(model.device) if sched.enable_chunked_prefill else sched.max_model_len
            )
            sched.max_num_batched_tokens = max(floor, sched.max_num_seqs)
        if par.distributed_backend is None:
            par.distributed_backend = "nccl" if model.device.type == "cuda" else "gloo"

    def _cross_check(self) -> None:
        model, sched, par = self.model_config, self.scheduler_config, self.parallel_config
        _check(
            sched.max_model_len == model.max_model_len,
            f"scheduler max_model_len={sched.max_model_len} differs from the model's {model.max_model_len}",
        )
        _check(
            sched.max_num_batched_tokens >= sched.max_num_seqs,
            f"max_num_batched_tokens ({sched.max_num_batched_tokens}) must be >= max_num_seqs "
            f"({sched.max_num_seqs}): every running sequence needs at least one token per step",
        )
        if not sched.enable_chunked_prefill:
            _check(
                sched.max_num_batched_tokens >= sched.max_model_len,
                f"max_num_batched_tokens ({sched.max_num_batched_tokens}) is smaller than max_model_len "
                f"({sched.max_model_len}): without chunked prefill a long prompt could never be scheduled; "
                "raise max_num_batched_tokens, lower max_model_len or, from m3_paged on, set "
                "enable_chunked_prefill=True",
            )
        if par.distributed_backend == "nccl":
            _check(model.device.type == "cuda", "the nccl backend needs device='cuda'; use 'gloo' on the CPU")
        _check(isinstance(self.enforce_eager, bool), "enforce_eager must be a bool")
        _check(
            not (sched.async_scheduling and par.tensor_parallel_size > 1),
            "async_scheduling=True needs tensor_parallel_size=1: the worker ranks would need each step's "
            "sampled ids before the driver has read them; leave async_scheduling unset (off under TP)",
        )

    @classmethod
    def from_llm_kwargs(cls, model: str, **kwargs: Any) -> EngineConfig:
        """Build from `LLM(model, **kwargs)`; an unknown keyword gets a close-match suggestion."""
        targets = {cls_: {f.name for f in fields(cls_) if f.init} for cls_ in _SUB_CONFIGS}
        parts: dict[type, dict[str, Any]] = {cls_: {} for cls_ in _SUB_CONFIGS}
        enforce_eager = kwargs.pop("enforce_eager", False)
        for key, value in kwargs.items():
            owner = next((c for c, names in targets.items() if key in names), None)
            if owner is None:
                raise ValueError(unknown_argument_message(key, known_llm_arguments()))
            parts[owner][key] = value
        model_cfg = ModelConfig(model=model, **parts[ModelConfig])
        parts[SchedulerConfig].pop("max_model_len", None)  # always taken from the model config
        return cls(
            model_config=model_cfg,
            cache_config=CacheConfig(**parts[CacheConfig]),
            scheduler_config=SchedulerConfig(**parts[SchedulerConfig]),
            parallel_config=ParallelConfig(**parts[ParallelConfig]),
            enforce_eager=enforce_eager,
        )


_SUB_CONFIGS = (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig)


def known_llm_arguments() -> list[str]:
    """Every keyword `LLM(...)` can take (model is positional)."""
    names = {f.name for c in _SUB_CONFIGS for f in fields(c) if f.init} | {"enforce_eager"}
    return sorted(names - {"model"})


def unknown_argument_message(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown argument {key!r}.{hint} Allowed: {', '.join(allowed)}"
