"""EngineConfig: syncing of derived values, every validation error and every cross-check."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from m0_config.config import (
    SUPPORTED_ARCHITECTURES,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    check_architecture,
    known_llm_arguments,
    read_checkpoint_config,
    resolve_device,
    resolve_dtype,
)

pytestmark = pytest.mark.m0

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


@pytest.fixture(scope="module")
def model_config(qwen3_dir) -> ModelConfig:
    return ModelConfig(qwen3_dir, device="cpu")


def written_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Syncing: the values EngineConfig derives from one config for another.
# ---------------------------------------------------------------------------------------------


def test_max_model_len_defaults_to_the_checkpoint_limit_and_is_synced(qwen3_dir):
    cfg = EngineConfig.from_llm_kwargs(qwen3_dir, device="cpu")
    limit = written_config(qwen3_dir)["max_position_embeddings"]
    assert cfg.model_config.max_model_len == limit
    assert cfg.scheduler_config.max_model_len == limit


def test_explicit_max_model_len_reaches_the_scheduler(qwen3_dir):
    cfg = EngineConfig.from_llm_kwargs(qwen3_dir, device="cpu", max_model_len=100)
    assert cfg.model_config.max_model_len == 100
    assert cfg.scheduler_config.max_model_len == 100


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, 2048),  # chunked prefill: a fixed budget of 2048
        ({"max_num_seqs": 4096}, 4096),  # ... but at least one token per running sequence
        ({"enable_chunked_prefill": False}, 512),  # no chunking: a whole max_model_len prompt must fit
        ({"enable_chunked_prefill": False, "max_num_seqs": 600}, 600),
        ({"enable_chunked_prefill": False, "max_model_len": 64, "max_num_seqs": 8}, 64),
        ({"max_num_batched_tokens": 300}, 300),  # an explicit value is kept
    ],
)
def test_max_num_batched_tokens_derivation(qwen3_dir, kwargs, expected):
    cfg = EngineConfig.from_llm_kwargs(qwen3_dir, device="cpu", **kwargs)
    assert cfg.scheduler_config.max_num_batched_tokens == expected


def test_engine_keywords_are_validated_by_their_config(qwen3_dir):
    """What LLM(...) of m3 and later builds: a bad value reaches its config part's check."""
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        EngineConfig.from_llm_kwargs(qwen3_dir, device="cpu", gpu_memory_utilization="0.5")


def test_distributed_backend_is_gloo_on_cpu(qwen3_dir):
    cfg = EngineConfig.from_llm_kwargs(qwen3_dir, device="cpu")
    assert cfg.parallel_config.distributed_backend == "gloo"
    explicit = EngineConfig.from_llm_kwargs(qwen3_dir, device="cpu", distributed_backend="gloo")
    assert explicit.parallel_config.distributed_backend == "gloo"


def test_from_llm_kwargs_routes_each_keyword_to_its_config(qwen3_dir):
    cfg = EngineConfig.from_llm_kwargs(
        qwen3_dir,
        dtype="bfloat16",
        seed=7,
        device="cpu",
        block_size=32,
        gpu_memory_utilization=0.5,
        enable_prefix_caching=False,
        max_num_seqs=8,
        tensor_parallel_size=2,
        enforce_eager=True,
    )
    assert cfg.model_config.torch_dtype == torch.bfloat16 and cfg.model_config.seed == 7
    assert cfg.cache_config.block_size == 32 and cfg.cache_config.gpu_memory_utilization == 0.5
    assert cfg.cache_config.enable_prefix_caching is False
    assert cfg.scheduler_config.max_num_seqs == 8
    assert cfg.parallel_config.tensor_parallel_size == 2 and cfg.parallel_config.world_size == 2
    assert cfg.enforce_eager is True


def test_model_config_reads_the_checkpoint(model_config, qwen3_dir):
    raw = written_config(qwen3_dir)
    assert model_config.architecture == "Qwen3ForCausalLM" == raw["architectures"][0]
    assert model_config.tokenizer == qwen3_dir  # defaults to the model folder
    assert model_config.num_layers == raw["num_hidden_layers"]
    assert model_config.num_attention_heads == raw["num_attention_heads"]
    assert model_config.num_kv_heads == raw["num_key_value_heads"]
    assert model_config.head_dim == raw["head_dim"]  # Qwen3: head_dim * heads != hidden_size
    assert model_config.vocab_size == raw["vocab_size"]
    assert model_config.device == torch.device("cpu")


def test_head_dim_and_kv_heads_fall_back_for_older_configs():
    # A config without head_dim / num_key_value_heads (multi-head attention, Llama-2-style).
    fake = SimpleNamespace(num_hidden_layers=3, num_attention_heads=8, hidden_size=256, vocab_size=10)
    mc = ModelConfig.__new__(ModelConfig)
    mc.hf_config, mc.torch_dtype = fake, torch.float16
    assert mc.num_kv_heads == 8
    assert mc.head_dim == 32
    assert mc.kv_cache_bytes_per_token() == 2 * 3 * 8 * 32 * 2


def test_known_llm_arguments_are_the_init_fields():
    names = known_llm_arguments()
    assert "model" not in names  # positional
    assert {"max_num_seqs", "block_size", "tensor_parallel_size", "enforce_eager", "dtype"} <= set(names)
    # Derived fields are not arguments.
    assert not {"architecture", "hf_config", "torch_dtype"} & set(names)


# ---------------------------------------------------------------------------------------------
# Unknown keyword arguments.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "typo, suggestion",
    [
        ("max_num_seq", "max_num_seqs"),
        ("tensor_parallel", "tensor_parallel_size"),
        ("gpu_mem_utilization", "gpu_memory_utilization"),
        ("enable_prefix_cache", "enable_prefix_caching"),
    ],
)
def test_unknown_kwarg_suggests_the_close_match(qwen3_dir, typo, suggestion):
    with pytest.raises(ValueError, match=rf"unknown argument '{typo}'\. Did you mean '{suggestion}'\?"):
        EngineConfig.from_llm_kwargs(qwen3_dir, **{typo: 1})


def test_unknown_kwarg_without_a_close_match_lists_the_allowed_names(qwen3_dir):
    with pytest.raises(ValueError) as e:
        EngineConfig.from_llm_kwargs(qwen3_dir, zzzz=1)
    assert "Did you mean" not in str(e.value)
    assert "Allowed: " in str(e.value) and "max_num_seqs" in str(e.value)


# ---------------------------------------------------------------------------------------------
# ModelConfig: the checkpoint folder, architecture, device, dtype, max_model_len.
# ---------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="does not exist.*never downloads"):
        read_checkpoint_config(missing)
    with pytest.raises(ValueError, match="does not exist"):
        EngineConfig.from_llm_kwargs(missing)


def test_model_must_be_a_path():
    with pytest.raises(ValueError, match="model must be a folder path, got int"):
        ModelConfig(123)


def test_folder_without_config_json(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        ModelConfig(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match=r"unsupported architecture \['GPT2LMHeadModel'\]") as e:
        ModelConfig(str(tmp_path))
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(e.value)


def test_config_without_architectures():
    with pytest.raises(ValueError, match=r"none given in config.json"):
        check_architecture({})
    # The first supported entry wins when a checkpoint lists several.
    assert check_architecture({"architectures": ["Foo", "LlamaForCausalLM"]}) == "LlamaForCausalLM"


def test_missing_tokenizer_folder(qwen3_dir, tmp_path):
    with pytest.raises(ValueError, match="tokenizer folder .* does not exist"):
        ModelConfig(qwen3_dir, tokenizer=str(tmp_path / "nope"))


def test_seed_must_be_an_int(qwen3_dir):
    with pytest.raises(ValueError, match="seed must be an int"):
        ModelConfig(qwen3_dir, seed="0")


@pytest.mark.parametrize("max_model_len", [0, -1, 1.5, "64"])
def test_max_model_len_must_be_a_positive_int(qwen3_dir, max_model_len):
    with pytest.raises(ValueError, match="max_model_len must be a positive int"):
        ModelConfig(qwen3_dir, max_model_len=max_model_len)


def test_max_model_len_above_the_checkpoint_limit_is_rejected(qwen3_dir):
    limit = written_config(qwen3_dir)["max_position_embeddings"]
    assert ModelConfig(qwen3_dir, max_model_len=limit).max_model_len == limit  # the limit itself is fine
    with pytest.raises(ValueError, match=rf"max_model_len={limit + 1} .* max_position_embeddings={limit}"):
        ModelConfig(qwen3_dir, max_model_len=limit + 1)
    with pytest.raises(ValueError, match="larger than the checkpoint's"):
        EngineConfig.from_llm_kwargs(qwen3_dir, max_model_len=limit + 1)


def test_checkpoint_without_a_length_limit():
    mc = ModelConfig.__new__(ModelConfig)
    mc.hf_config = SimpleNamespace()  # no max_position_embeddings
    mc.max_model_len = None
    with pytest.raises(ValueError, match="no max_position_embeddings; pass max_model_len"):
        mc._resolve_max_model_len()
    mc.max_model_len = 4096  # then any explicit positive length is accepted
    assert mc._resolve_max_model_len() == 4096


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'meta'"):
        resolve_device("meta")


@needs_no_cuda
def test_cuda_without_a_gpu_is_a_clear_error(qwen3_dir):
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        ModelConfig(qwen3_dir, device="cuda")


# dtype: the CPU path, explicit names and aliases, and the CUDA "auto" path with a fake CUDA device.
CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # constructing a device object needs no GPU


@pytest.mark.parametrize(
    "dtype, expected",
    [
        ("auto", torch.float32),
        ("float32", torch.float32),
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),
        ("half", torch.float16),
        ("bf16", torch.bfloat16),
        ("fp32", torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
    ],
)
def test_resolve_dtype_on_cpu(dtype, expected):
    # The checkpoint's dtype does not matter on CPU: "auto" is float32, the correctness reference.
    assert resolve_dtype(dtype, {"dtype": "bfloat16"}, CPU) == expected


@pytest.mark.parametrize("dtype", ["float8", "int8", "", torch.int8, torch.float64])
def test_resolve_dtype_rejects_unknown_types(dtype):
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype(dtype, {}, CPU)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"dtype": "float16"}, torch.float16),
        ({"torch_dtype": "float16"}, torch.float16),  # older transformers' key
        ({"torch_dtype": "bfloat16"}, torch.bfloat16),
        ({"dtype": "float16", "torch_dtype": "bfloat16"}, torch.float16),  # the newer key wins
        ({}, torch.bfloat16),  # nothing written: bfloat16
    ],
)
def test_resolve_dtype_auto_on_cuda_reads_the_checkpoint(raw, expected):
    assert resolve_dtype("auto", raw, CUDA) == expected


@pytest.mark.parametrize("bf16_supported, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_float32_checkpoint_runs_in_half_precision_on_cuda(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    assert resolve_dtype("auto", {"torch_dtype": "float32"}, CUDA) == expected
    assert resolve_dtype("float32", {"torch_dtype": "float32"}, CUDA) == torch.float32  # explicit wins


def test_model_config_dtype(qwen3_dir):
    assert ModelConfig(qwen3_dir, device="cpu").torch_dtype == torch.float32
    assert ModelConfig(qwen3_dir, device="cpu", dtype="bfloat16").torch_dtype == torch.bfloat16


def test_kv_cache_bytes_per_token(model_config):
    # Qwen3 toy: 2 (K and V) * 2 layers * 2 kv heads * head_dim 32 * 4 bytes (float32).
    assert model_config.kv_cache_bytes_per_token() == 2 * 2 * 2 * 32 * 4


# ---------------------------------------------------------------------------------------------
# CacheConfig, SchedulerConfig, ParallelConfig: their own validation.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_size": 0}, "block_size must be a power of two in 1..1024"),
        ({"block_size": 24}, "block_size must be a power of two"),
        ({"block_size": 2048}, "block_size must be a power of two in 1..1024"),
        ({"block_size": 16.0}, "block_size must be a power of two"),
        ({"gpu_memory_utilization": 0.0}, r"gpu_memory_utilization must be in \(0, 1\]"),
        ({"gpu_memory_utilization": 1.01}, r"gpu_memory_utilization must be in \(0, 1\]"),
        ({"gpu_memory_utilization": "0.5"}, r"gpu_memory_utilization must be in \(0, 1\]"),
        ({"num_gpu_blocks_override": 0}, "num_gpu_blocks_override must be a positive int or None"),
        ({"num_gpu_blocks_override": 2.5}, "num_gpu_blocks_override must be a positive int or None"),
        ({"kv_cache_memory_bytes": -1}, "kv_cache_memory_bytes must be a positive int or None"),
        ({"enable_prefix_caching": 1}, "enable_prefix_caching must be a bool"),
    ],
)
def test_cache_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CacheConfig(**kwargs)


def test_cache_config_accepts_the_boundaries():
    for bs in (1, 2, 16, 1024):
        assert CacheConfig(block_size=bs).block_size == bs
    assert CacheConfig(gpu_memory_utilization=1.0, num_gpu_blocks_override=1).num_gpu_blocks_override == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_num_seqs": 0}, "max_num_seqs must be an int >= 1"),
        ({"max_num_seqs": "8"}, "max_num_seqs must be an int >= 1"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens must be an int >= 1"),
        ({"max_num_batched_tokens": 1.5}, "max_num_batched_tokens must be an int >= 1"),
        ({"enable_chunked_prefill": "yes"}, "enable_chunked_prefill must be a bool"),
    ],
)
def test_scheduler_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tensor_parallel_size": 0}, "tensor_parallel_size must be an int >= 1"),
        ({"tensor_parallel_size": 1.0}, "tensor_parallel_size must be an int >= 1"),
        ({"pipeline_parallel_size": 2}, "pipeline_parallel_size must be 1"),
        ({"data_parallel_size": 2}, "data_parallel_size must be 1"),
        ({"distributed_backend": "mpi"}, "distributed_backend must be 'nccl', 'gloo' or None"),
    ],
)
def test_parallel_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs)


def test_world_size():
    assert ParallelConfig().world_size == 1
    assert ParallelConfig(tensor_parallel_size=4).world_size == 4


# ---------------------------------------------------------------------------------------------
# EngineConfig cross-checks (rules that span several configs).
# ---------------------------------------------------------------------------------------------


def test_scheduler_max_model_len_must_match_the_model(model_config):
    with pytest.raises(ValueError, match=r"scheduler max_model_len=100 differs from the model's 512"):
        EngineConfig(model_config, scheduler_config=SchedulerConfig(max_model_len=100))


def test_batched_tokens_must_cover_max_num_seqs(qwen3_dir):
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) must be >= max_num_seqs \(16\)"):
        EngineConfig.from_llm_kwargs(qwen3_dir, max_num_seqs=16, max_num_batched_tokens=8)
    cfg = EngineConfig.from_llm_kwargs(qwen3_dir, max_num_seqs=16, max_num_batched_tokens=16)
    assert cfg.scheduler_config.max_num_batched_tokens == 16  # equality is allowed


def test_without_chunked_prefill_a_full_prompt_must_fit_one_step(qwen3_dir):
    with pytest.raises(ValueError, match=r"\(256\) is smaller than max_model_len \(512\).*chunked prefill"):
        EngineConfig.from_llm_kwargs(qwen3_dir, enable_chunked_prefill=False, max_num_batched_tokens=256)
    # The same budget is fine with chunked prefill, or with a shorter max_model_len.
    EngineConfig.from_llm_kwargs(qwen3_dir, max_num_batched_tokens=256)
    EngineConfig.from_llm_kwargs(
        qwen3_dir, enable_chunked_prefill=False, max_num_batched_tokens=256, max_model_len=256
    )


def test_nccl_needs_cuda(qwen3_dir):
    with pytest.raises(ValueError, match="the nccl backend needs device='cuda'"):
        EngineConfig.from_llm_kwargs(qwen3_dir, device="cpu", distributed_backend="nccl")


def test_enforce_eager_must_be_a_bool(qwen3_dir):
    with pytest.raises(ValueError, match="enforce_eager must be a bool"):
        EngineConfig.from_llm_kwargs(qwen3_dir, enforce_eager="yes")


def test_sub_configs_validate_inside_from_llm_kwargs(qwen3_dir):
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        EngineConfig.from_llm_kwargs(qwen3_dir, block_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an int >= 1"):
        EngineConfig.from_llm_kwargs(qwen3_dir, tensor_parallel_size=0)
