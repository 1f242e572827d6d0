"""layer_norm: forward and the x / weight / bias gradients vs the fp64 oracle, optional weight and bias."""
import pytest
import torch

from hf_fastkern.kernels import layer_norm as ln_mod
from hf_fastkern.kernels import reference
from hf_fastkern.kernels.layer_norm import layer_norm, layer_norm_bwd, layer_norm_fwd
from tests.harness import (
    ALL,
    ERROR_CASES,
    VIEW_IDS,
    ZERO_IDS,
    case_ids,
    case_params,
    check_bitwise_case,
    check_error_case,
    check_norm_eps_at_dtype_limit,
    check_norm_tokens_times_hidden_over_2_31,
    check_op,
    check_view_case,
    check_zero_length_case,
    dtype_ids,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]


def _x(shape, dtype, device):
    # an offset mean, as residual streams have, so the mean subtraction matters
    return (torch.randn(shape, device=device) + 0.5).to(dtype)


def _p(hidden, dtype, device, centre):
    return (centre + 0.5 * torch.randn(hidden, device=device)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(3, 1), (5, 127), (2, 3, 1000), (2, 4097)], ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_matches_reference(shape, dtype, device):
    h = shape[-1]
    check_op(lambda x, w, b: layer_norm(x, w, b, 1e-5), lambda x, w, b: reference.layer_norm(x, w, b, 1e-5),
             [_x(shape, dtype, device), _p(h, dtype, device, 1.0), _p(h, dtype, device, 0.0)], dtype, "layer_norm")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("has_w", [True, False], ids=["w", "no_w"])
@pytest.mark.parametrize("has_b", [True, False], ids=["b", "no_b"])
def test_layer_norm_optional_affine(has_w, has_b, dtype, device):
    h = 96
    ins = [_x((2, 5, h), dtype, device)]
    if has_w:
        ins.append(_p(h, dtype, device, 1.0))
    if has_b:
        ins.append(_p(h, dtype, device, 0.0))

    def split(args):
        it = iter(args[1:])
        return args[0], (next(it) if has_w else None), (next(it) if has_b else None)

    check_op(lambda *a: layer_norm(*split(a)), lambda *a: reference.layer_norm(*split(a)), ins, dtype, "layer_norm")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_layer_norm_fp32_params_low_precision_input(dtype, device):
    x = _x((6, 200), dtype, device)
    w, b = _p(200, torch.float32, device, 1.0), _p(200, torch.float32, device, 0.0)
    assert layer_norm(x, w, b).dtype == dtype
    check_op(layer_norm, reference.layer_norm, [x, w, b], dtype, "layer_norm[fp32 params]")


def test_layer_norm_non_contiguous(device):
    x = _x((4, 6, 130), torch.float32, device).transpose(0, 1)[..., :100]
    w, b = _p(100, torch.float32, device, 1.0), _p(100, torch.float32, device, 0.0)
    check_op(layer_norm, reference.layer_norm, [x, w, b], torch.float32, "layer_norm[non-contiguous]")


@pytest.mark.parametrize("shape", [(0, 64), (3, 0, 64)], ids=["2d", "3d"])
def test_layer_norm_zero_tokens(shape, device):
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.ones(64, device=device, requires_grad=True)
    b = torch.zeros(64, device=device, requires_grad=True)
    y = layer_norm(x, w, b)
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_layer_norm_bad_input(device):
    x = torch.randn(4, 64, device=device)
    with pytest.raises(ValueError, match=r"bias must have shape \(64,\)"):
        layer_norm(x, torch.ones(64, device=device), torch.zeros(65, device=device))
    with pytest.raises(ValueError, match=r"weight must have shape \(64,\)"):
        layer_norm(x, torch.ones(2, 64, device=device), None)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        layer_norm(torch.ones(4, 64, dtype=torch.int64, device=device), None, None)
    with pytest.raises(ValueError, match="one device"):
        layer_norm(x, torch.ones(64, device="meta"), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_norm_custom_op_direct(dtype, device):
    """The torch.library op pair (what torch.compile runs) and its registered autograd, called eagerly."""
    ins = [_x((7, 130), dtype, device), _p(130, dtype, device, 1.0), _p(130, dtype, device, 0.0)]
    check_op(lambda x, w, b: layer_norm_fwd(x, w, b, 1e-5)[0], reference.layer_norm, ins, dtype, "layer_norm_fwd[op]")


def test_layer_norm_torch_compile_fullgraph(device):
    x = _x((4, 64), torch.float32, device).requires_grad_()
    w, b = _p(64, torch.float32, device, 1.0).requires_grad_(), _p(64, torch.float32, device, 0.0).requires_grad_()
    fn = torch.compile(lambda x, w, b: layer_norm(x, w, b), fullgraph=True, backend="aot_eager")
    y = fn(x, w, b)
    torch.testing.assert_close(y, reference.layer_norm(x.detach(), w.detach(), b.detach()), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert b.grad is not None


@pytest.mark.parametrize("w_dtype,b_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (None, torch.float16), (torch.float16, None)],
                         ids=["w32_b16", "w16_b32", "bias_only", "weight_only"])
def test_layer_norm_bwd_op_param_dtypes(w_dtype, b_dtype, device):
    """The backward op writes dW and dB in the parameters' own dtypes (the cast is fused into the partial-sum
    reduction), and they equal the reference gradients. Autograd would silently cast a wrong-dtype gradient,
    so this calls the op directly."""
    h = 72
    x = _x((3, 4, h), torch.bfloat16, device)
    w = _p(h, w_dtype, device, 1.0) if w_dtype else None
    b = _p(h, b_dtype, device, 0.0) if b_dtype else None
    dy = torch.randn(3, 4, h, device=device).to(torch.bfloat16)
    y, stats = layer_norm_fwd(x, w, b, 1e-5)
    assert stats.shape == (2, 12) and stats.dtype == torch.float32
    dx, dw, db = layer_norm_bwd(dy, x, w, stats, b_dtype, w is not None, b is not None)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert dw.dtype == (w_dtype or torch.float32) and dw.shape == ((h,) if w is not None else (0,))
    assert db.dtype == (b_dtype or torch.float32) and db.shape == ((h,) if b is not None else (0,))

    def split(args):
        it = iter(args[1:])
        return args[0], (next(it) if w is not None else None), (next(it) if b is not None else None)

    check_op(lambda *a: layer_norm(*split(a)), lambda *a: reference.layer_norm(*split(a)),
             [x] + [t for t in (w, b) if t is not None], torch.bfloat16, "layer_norm[param dtypes]")


def test_layer_norm_tuned_launch_and_one_node(device):
    """First launch per key through the autotuner, later ones direct (bitwise equal); one autograd node for
    a 3-D input (no view nodes)."""
    ln_mod._FWD._chosen.clear()
    ln_mod._BWD._chosen.clear()
    x = _x((2, 3, 80), torch.float16, device)
    w, b = _p(80, torch.float16, device, 1.0), _p(80, torch.float16, device, 0.0)
    dy = torch.randn(2, 3, 80, device=device).to(torch.float16)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = layer_norm(*leaves)
        assert [type(f).__name__ for f, _ in y.grad_fn.next_functions] == ["AccumulateGrad"] * 3
        y.backward(dy)
        runs.append([y] + [t.grad for t in leaves])
    assert len(ln_mod._FWD._chosen) == 1 and len(ln_mod._BWD._chosen) == 1
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("hidden", [2048, 4096, 8192])
@pytest.mark.parametrize("tokens", [4096, 65536])
def test_layer_norm_gpu(tokens, hidden, dtype):
    if tokens * hidden > 2**28 and dtype == torch.float32:
        tokens //= 4
    ins = [_x((tokens, hidden), dtype, "cuda"), _p(hidden, dtype, "cuda", 1.0), _p(hidden, dtype, "cuda", 0.0)]
    check_op(layer_norm, reference.layer_norm, ins, dtype, "layer_norm[gpu]")


# --- edge cases ---


@pytest.mark.parametrize("dtype", ALL, ids=dtype_ids(ALL))
@pytest.mark.parametrize("eps_kind", ["zero", "tiny", "dtype_eps"])
@pytest.mark.parametrize("op", ["layer_norm"])
def test_norm_eps_at_dtype_limit(op, eps_kind, dtype, device):
    """eps = 0, finfo(dtype).tiny, finfo(dtype).eps with a zero row and a constant row (tests/harness.py)."""
    check_norm_eps_at_dtype_limit(op, eps_kind, dtype, device)


# --- huge sizes (GPU): past 2**31 elements ---


@pytest.mark.gpu
@pytest.mark.usefixtures("free_cuda_memory")
@pytest.mark.parametrize("op", ["layer_norm"])
def test_norm_tokens_times_hidden_over_2_31(op):
    check_norm_tokens_times_hidden_over_2_31(op)


# --- bad input ---


@pytest.mark.parametrize("case", case_params(case_ids(ERROR_CASES, "layer_norm/")))
def test_bad_input_raises_naming_argument(case, device):
    check_error_case(case, device)


@pytest.mark.parametrize("case", case_params(case_ids(VIEW_IDS, "layer_norm/")))
def test_views_give_correct_results(case, device):
    check_view_case(case, device)


@pytest.mark.parametrize("case", case_ids(ZERO_IDS, "layer_norm/"), ids=case_ids(ZERO_IDS, "layer_norm/"))
def test_zero_length_batches(case, device):
    check_zero_length_case(case, device)


# --- determinism ---


@pytest.mark.parametrize("case", ["layer_norm"], ids=["layer_norm"])
def test_bitwise_identical_gradients(case, device):
    check_bitwise_case(case, device, big=False, runs=2)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["layer_norm"], ids=["layer_norm"])
def test_bitwise_identical_gradients_gpu_real_size(case):
    """Many programs in flight (where atomics would reorder sums): three runs, bit-identical."""
    check_bitwise_case(case, "cuda", big=True, runs=3)
    torch.cuda.empty_cache()
