"""Build the model from the registry and fill its weights straight from *.safetensors.

No transformers involved: the checkpoint's tensors are read one at a time with safetensors.safe_open
and handed to the owning layer's `weight_loader`, which copies it into place (and, in m5, keeps only
its rank's slice). Names map to parameters through the model's `packed_modules_mapping` (q/k/v into
qkv_proj, gate/up into gate_up_proj) and, for a mixture-of-experts model, its `expert_params_mapping`
(each expert's gate/up/down tensor into the stacked expert weights, shard id (expert, shard)). The
checks make a broken checkpoint fail loudly instead of running with garbage: every parameter must be
filled exactly once (whole, or every one of its shards), and every checkpoint tensor must land
somewhere.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import nn

from m0_config.config import ModelConfig
from m2_kvcache.layers.attention import AttentionBackend
from m2_kvcache.layers.layer_set import ModelLayers
from m2_kvcache.layers.linear import default_weight_loader
from m2_kvcache.models.registry import get_model_class

# Tensors some checkpoints carry that are not weights: old Llama exports saved RoPE's inv_freq.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters are created in `dtype` inside the block (buffers that need float32 say so)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(
    model_config: ModelConfig, attn_backend: AttentionBackend | None = None, layers: ModelLayers | None = None
) -> nn.Module:
    """The checkpoint's model class, built directly on the device in the resolved dtype, with its
    weights loaded, in eval mode."""
    model_cls = get_model_class(model_config.architecture)
    with default_dtype(model_config.torch_dtype), torch.device(model_config.device):
        model = model_cls(model_config.hf_config, attn_backend=attn_backend, layers=layers)
    load_weights(model, model_config.model)
    return model.eval()


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's weight files: those the index names for a sharded checkpoint, else every
    *.safetensors in the folder."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(model_dir, n) for n in names]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"the index names shard files that do not exist: {missing}")
        return files
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir!r} (other weight formats are not supported)")
    return files


def iterate_weights(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, CPU tensor) for every tensor, one at a time (memory stays at one tensor)."""
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def map_checkpoint_name(name: str, packed_modules_mapping: dict) -> tuple[str, object]:
    """Checkpoint name -> (parameter name, shard id): ...self_attn.k_proj.weight ->
    (...self_attn.qkv_proj.weight, "k"); an unfused name maps to itself with shard id None."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in packed_modules_mapping:
            packed, shard_id = packed_modules_mapping[part]
            return ".".join(parts[:i] + [packed] + parts[i + 1 :]), shard_id
    return name, None


def map_expert_name(name: str, expert_params_mapping: dict) -> tuple[str, object] | None:
    """Per-expert checkpoint name -> (stacked parameter name, (expert id, shard)):
    ...mlp.experts.3.up_proj.weight -> (...mlp.experts.gate_up_proj, (3, 1)); None for any other name."""
    prefix, sep, rest = name.partition(".experts.")
    target = expert_params_mapping.get(f"experts.{rest}") if sep else None
    if target is None:
        return None
    param, shard_id = target
    return f"{prefix}.{param}", shard_id


def expected_expert_shards(param_name: str, expert_params_mapping: dict) -> dict[object, str] | None:
    """shard id -> checkpoint name for a stacked expert parameter (None for any other parameter)."""
    prefix, sep, rest = param_name.partition(".experts.")
    if not sep:
        return None
    shards = {
        sid: f"{prefix}.{ckpt}" for ckpt, (p, sid) in expert_params_mapping.items() if p == f"experts.{rest}"
    }
    return shards or None


def expected_shards(param_name: str, packed_modules_mapping: dict) -> dict[object, str]:
    """shard id -> checkpoint module name for a fused parameter ({None: ""} for an unfused one)."""
    parts = set(param_name.split("."))
    shards = {sid: src for src, (packed, sid) in packed_modules_mapping.items() if packed in parts}
    return shards or {None: ""}


def load_weights(model: nn.Module, model_dir: str) -> None:
    """Fill every parameter of `model` from the checkpoint, exactly once; ValueError naming the tensor
    for one that is missing, unexpected, mis-shaped or loaded twice."""
    mapping = getattr(model, "packed_modules_mapping", {})
    experts = getattr(model, "expert_params_mapping", {})
    params = dict(model.named_parameters())  # a tied parameter appears once, under its first name
    # Other names of a tied parameter (lm_head.weight when tied): the checkpoint may repeat it; skip.
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(params)
    loaded: dict[str, set] = defaultdict(set)
    for ckpt_name, tensor in iterate_weights(model_dir):
        if ckpt_name.endswith(_IGNORED_SUFFIXES) or ckpt_name in aliases:
            continue
        name, shard_id = map_expert_name(ckpt_name, experts) or map_checkpoint_name(ckpt_name, mapping)
        if name not in params:
            raise ValueError(f"unexpected tensor {ckpt_name!r} in the checkpoint: the model has no {name!r}")
        # A whole (fused or stacked) tensor overlaps every shard of the same parameter.
        if shard_id in loaded[name] or None in loaded[name] or (shard_id is None and loaded[name]):
            raise ValueError(f"tensor {ckpt_name!r} appears twice in the checkpoint (or overlaps another)")
        module = model.get_submodule(name.rpartition(".")[0])
        weight_loader = getattr(module, "weight_loader", default_weight_loader)
        try:
            weight_loader(params[name], tensor, shard_id)
        except ValueError as e:
            raise ValueError(f"tensor {ckpt_name!r} (parameter {name!r}): {e}") from None
        loaded[name].add(shard_id)
    _check_all_loaded(params, loaded, mapping, experts)


def _check_all_loaded(params: dict, loaded: dict, mapping: dict, experts: dict) -> None:
    """Every parameter (every shard of a fused one, unless it came whole) must have been filled; name
    what was not, by its checkpoint name."""
    missing = []
    for name in params:
        if None in loaded[name]:  # loaded whole
            continue
        expert_shards = expected_expert_shards(name, experts)
        if expert_shards is not None:
            missing += [ckpt for shard_id, ckpt in expert_shards.items() if shard_id not in loaded[name]]
            continue
        for shard_id, src in expected_shards(name, mapping).items():
            if shard_id not in loaded[name]:
                missing.append(name if shard_id is None else name.replace(f".{mapping[src][0]}.", f".{src}."))
    if missing:
        hint = ""
        if "lm_head.weight" in missing:
            hint = (
                " (config.json says tie_word_embeddings=false, so lm_head.weight must be in the checkpoint)"
            )
        raise ValueError(f"missing tensor(s) in the checkpoint: {', '.join(missing)}{hint}")
