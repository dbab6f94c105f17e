"""The split-K linear and the RMSNorm that sums its partials, against their torch references; the layer
pair (`SplitKRowLinear` -> `FusedRMSNorm`) against m2's dense linear + norm.

On CPU the kernels run in Triton's interpreter (small shapes); the `gpu` cases repeat the comparisons
at Qwen3-0.6B's o_proj / down_proj sizes in bfloat16, where programmatic dependent launch is on.
"""

from __future__ import annotations

import pytest
import torch

from m2_kvcache.layers.layer_set import ModelLayers
from m2_kvcache.layers.layernorm import RMSNorm
from m2_kvcache.layers.linear import RowLinear
from m3_paged.ops.pdl import use_pdl
from m4_cudagraph.fused_layers import FusedRMSNorm, SplitKPartials, SplitKRowLinear, fused_layers
from m4_cudagraph.ops import rms_norm_splitk, rms_norm_splitk_ref, splitk_linear, splitk_linear_ref
from m4_cudagraph.ops.splitk_linear import MAX_BLOCK_K, SPLITK_MAX_TOKENS

pytestmark = pytest.mark.m4

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def operands(num_tokens, k, n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
    return x, w


# (num_tokens, K, N, block_k): K a multiple of the slice, K with a short last slice, N not a
# multiple of the column tile, a single slice, a strided x (see below).
CPU_CASES = [(1, 256, 64, 64), (5, 200, 48, 64), (17, 96, 40, None), (33, 512, 96, 128), (3, 24, 16, None)]
GPU_CASES = [(1, 2048, 1024, None), (16, 3072, 1024, None), (32, 2048, 1024, None), (7, 1000, 300, None)]


# Triton's CPU interpreter multiplies bfloat16 dot operands as raw 16-bit integers, so bfloat16 is
# checked on the GPU only (the engine runs this kernel on CUDA only).
@pytest.mark.parametrize(
    "device,case,dtype",
    [("cpu", c, torch.float32) for c in CPU_CASES]
    + [
        pytest.param("cuda", c, dtype, marks=pytest.mark.gpu)
        for c in GPU_CASES
        for dtype in (torch.float32, torch.bfloat16)
    ],
)
def test_splitk_linear_partials_equal_reference(device, case, dtype):
    num_tokens, k, n, block_k = case
    x, w = operands(num_tokens, k, n, dtype, device)
    partials = splitk_linear(x, w, block_k=block_k)
    k_per_split = block_k or min(MAX_BLOCK_K, max(16, 1 << (k - 1).bit_length()))
    expected = splitk_linear_ref(x, w, k_per_split)
    assert partials.shape == expected.shape == (-(-k // k_per_split), num_tokens, n)
    torch.testing.assert_close(partials.cpu(), expected.cpu(), **TOL[dtype])
    # the slices add up to the whole product
    torch.testing.assert_close(
        partials.sum(0).cpu(), (x.double() @ w.double().t()).float().cpu(), **TOL[dtype]
    )


def test_splitk_linear_reads_strided_rows():
    """x may be a row-strided view (the attention output of a padded batch, say)."""
    x, w = operands(6, 128, 32, torch.float32, "cpu")
    wide = torch.zeros(6, 200)
    wide[:, :128] = x
    strided = wide[:, :128]
    assert not strided.is_contiguous()
    torch.testing.assert_close(splitk_linear(strided, w, block_k=32), splitk_linear_ref(x, w, 32))


@pytest.mark.parametrize(
    "device,num_splits,num_tokens,n",
    [("cpu", 1, 3, 64), ("cpu", 4, 5, 96), ("cpu", 9, 1, 1024)]
    + [pytest.param("cuda", s, m, 1024, marks=pytest.mark.gpu) for s, m in [(8, 1), (12, 16), (8, 32)]],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_splitk_equals_reference(device, num_splits, num_tokens, n, dtype, with_residual):
    g = torch.Generator().manual_seed(num_splits * 100 + num_tokens)
    partials = torch.randn(num_splits, num_tokens, n, generator=g).to(device)
    weight = (torch.rand(n, generator=g) + 0.5).to(device, dtype)
    residual = torch.randn(num_tokens, n, generator=g).to(device, dtype) if with_residual else None
    kept = residual.clone() if with_residual else None
    got = rms_norm_splitk(partials, weight, 1e-6, residual)
    expected = rms_norm_splitk_ref(partials, weight, 1e-6, residual)
    for a, e in zip(*((got, expected) if with_residual else ((got,), (expected,)))):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), e.float(), **TOL[dtype])
    if with_residual:  # the residual is read, not modified
        torch.testing.assert_close(residual, kept)


def test_fused_layers_swap_only_the_dense_row_linear():
    assert fused_layers().row_linear is SplitKRowLinear

    class ParallelRow(RowLinear):  # stands in for m5's all-reducing row linear
        pass

    assert fused_layers(ModelLayers(row_linear=ParallelRow)).row_linear is ParallelRow


def test_partials_are_not_a_tensor():
    """Handing the partials to anything but FusedRMSNorm fails loudly instead of broadcasting."""
    partials = SplitKPartials(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError):
        partials + torch.zeros(3, 4)  # noqa: B018


def test_row_linear_on_cpu_is_the_dense_one():
    torch.manual_seed(0)
    layer = SplitKRowLinear(64, 32)
    layer.weight.data.normal_()
    x = torch.randn(4, 64)
    torch.testing.assert_close(layer(x), x @ layer.weight.t())


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16, SPLITK_MAX_TOKENS, SPLITK_MAX_TOKENS + 1, 300])
def test_row_linear_then_norm_equals_dense_on_gpu(num_tokens):
    """o_proj -> residual add + RMSNorm, Qwen3-0.6B sizes, bf16: the split-K pair (up to
    SPLITK_MAX_TOKENS rows; cuBLAS above) against m2's linear and torch RMSNorm."""
    if num_tokens <= SPLITK_MAX_TOKENS and not use_pdl(torch.device("cuda")):
        pytest.skip("split-K is used only with programmatic dependent launch (compute capability >= 9.0)")
    torch.manual_seed(num_tokens)
    dense, norm = RowLinear(2048, 1024).cuda().bfloat16(), RMSNorm(1024, 1e-6).cuda().bfloat16()
    dense.weight.data.normal_(std=2048**-0.5)
    norm.weight.data.uniform_(0.5, 1.5)
    split, fused_norm = (
        SplitKRowLinear(2048, 1024).cuda().bfloat16(),
        FusedRMSNorm(1024, 1e-6).cuda().bfloat16(),
    )
    split.load_state_dict(dense.state_dict())
    fused_norm.load_state_dict(norm.state_dict())
    x = torch.randn(num_tokens, 2048, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(num_tokens, 1024, device="cuda", dtype=torch.bfloat16)
    y = split(x)
    assert isinstance(y, SplitKPartials) == (num_tokens <= SPLITK_MAX_TOKENS)
    got_out, got_res = fused_norm(y, residual)
    exp_out, exp_res = norm(dense(x), residual)
    torch.testing.assert_close(got_out.float(), exp_out.float(), atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(got_res.float(), exp_res.float(), atol=3e-2, rtol=2e-2)
