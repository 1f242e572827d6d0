"""swiglu / geglu / gelu: forward and every gradient vs the fp64 oracle, both GELU forms, strided halves."""
import pytest
import torch

from hf_fastkern.kernels import activations as act_mod
from hf_fastkern.kernels import reference
from hf_fastkern.kernels.activations import GELU_TANH, SILU, geglu, gelu, glu_act_fwd, swiglu
from tests.harness import (
    BF,
    ERROR_CASES,
    HUGE_SIZES,
    I32,
    VIEW_IDS,
    ZERO_IDS,
    case_ids,
    case_params,
    check_bitwise_case,
    check_error_case,
    check_op,
    check_view_case,
    check_zero_length_case,
    huge_randn,
    huge_slices,
    huge_sync,
)
from tests.tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]
SHAPES = [(3, 1), (5, 127), (2, 3, 1000), (1, 4097)]
SHAPE_IDS = ["3x1", "5x127", "2x3x1000", "1x4097"]

OPS = {
    "swiglu": (swiglu, reference.swiglu),
    "geglu_erf": (lambda g, u: geglu(g, u, "none"), lambda g, u: reference.geglu(g, u, "none")),
    "geglu_tanh": (lambda g, u: geglu(g, u, "tanh"), lambda g, u: reference.geglu(g, u, "tanh")),
}


def _t(shape, dtype, device, scale=2.0):
    # scale 2: reaches the tails of silu/gelu where their derivatives turn over
    return (scale * torch.randn(shape, device=device)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("op", list(OPS))
def test_glu_matches_reference(op, shape, dtype, device):
    fn, ref = OPS[op]
    check_op(fn, ref, [_t(shape, dtype, device), _t(shape, dtype, device)], dtype, op)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_reference(approximate, shape, dtype, device):
    check_op(lambda x: gelu(x, approximate), lambda x: reference.gelu(x, approximate), [_t(shape, dtype, device)],
             dtype, f"gelu[{approximate}]")


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_glu_fused_halves(op, dtype, device):
    """gate/up as the two halves of one fused gate_up projection: strided rows, read without a copy."""
    fn, ref = OPS[op]
    inter = 100
    fused = _t((2, 3, 2 * inter), dtype, device).requires_grad_()

    def split(f, impl):
        return impl(f[..., :inter], f[..., inter:])

    check_op(lambda f: split(f, fn), lambda f: split(f, ref), [fused.detach()], dtype, f"{op}[fused halves]")


def test_glu_mixed_layouts(device):
    """gate contiguous, up a transposed (last-dim strided) view, and 0-d-like edge of a single row."""
    gate = _t((8, 5), torch.float32, device)
    up = _t((5, 8), torch.float32, device).t()
    check_op(swiglu, reference.swiglu, [gate, up], torch.float32, "swiglu[mixed layouts]")
    check_op(lambda x: gelu(x), lambda x: reference.gelu(x), [_t((), torch.float32, device)], torch.float32,
             "gelu[0-d]")


@pytest.mark.parametrize("op", ["swiglu", "geglu_tanh", "gelu"])
def test_activation_zero_elements(op, device):
    g = torch.randn(0, 3, 64, device=device, requires_grad=True)
    u = torch.randn(0, 3, 64, device=device, requires_grad=True)
    y = gelu(g) if op == "gelu" else OPS[op][0](g, u)
    assert y.shape == g.shape
    y.sum().backward()
    assert g.grad.shape == g.shape


def test_activation_bad_input(device):
    g = torch.randn(4, 64, device=device)
    with pytest.raises(ValueError, match=r"up must have the shape of gate \(4, 64\)"):
        swiglu(g, torch.randn(4, 63, device=device))
    with pytest.raises(TypeError, match="up must be a floating-point tensor"):
        geglu(g, torch.ones(4, 64, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="one dtype"):
        swiglu(g, g.half())
    with pytest.raises(ValueError, match="approximate must be"):
        gelu(g, "sigmoid")
    with pytest.raises(ValueError, match="one device"):
        swiglu(g, torch.randn(4, 64, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_glu_custom_op_direct(dtype, device):
    """The torch.library op pair (what torch.compile runs) and its registered autograd, called eagerly."""
    g, u = _t((7, 130), dtype, device), _t((7, 130), dtype, device)
    check_op(lambda g, u: glu_act_fwd(g, u, SILU), reference.swiglu, [g, u], dtype, "glu_act_fwd[op]")
    check_op(lambda g: glu_act_fwd(g, None, GELU_TANH), lambda g: reference.gelu(g, "tanh"), [g], dtype,
             "glu_act_fwd[op, gelu]")


def test_swiglu_torch_compile_fullgraph(device):
    g = _t((4, 64), torch.float32, device).requires_grad_()
    u = _t((4, 64), torch.float32, device).requires_grad_()
    fn = torch.compile(lambda g, u: swiglu(g, u) + 1.0, fullgraph=True, backend="aot_eager")
    y = fn(g, u)
    torch.testing.assert_close(y, reference.swiglu(g.detach(), u.detach()) + 1.0, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert g.grad is not None and u.grad is not None


@pytest.mark.parametrize("layout", ["contiguous", "fused_halves"])
def test_glu_tuned_launch_reuses_config(layout, device):
    """First launch per key through the autotuner, later ones with the remembered config (TunedLaunch, grid
    computed from it): bitwise-equal outputs and gradients, one remembered config per kernel."""
    act_mod._FWD._chosen.clear()
    act_mod._BWD._chosen.clear()
    inter = 70
    base = _t((3, 2 * inter), torch.bfloat16, device)
    dy = _t((3, inter), torch.bfloat16, device)
    runs = []
    for _ in range(2):
        if layout == "contiguous":
            leaves = [base[:, :inter].clone().requires_grad_(), base[:, inter:].clone().requires_grad_()]
            g, u = leaves
        else:
            leaves = [base.clone().requires_grad_()]
            g, u = leaves[0][:, :inter], leaves[0][:, inter:]
        y = swiglu(g, u)
        y.backward(dy)
        runs.append([y] + [t.grad for t in leaves])
    assert len(act_mod._FWD._chosen) == 1 and len(act_mod._BWD._chosen) == 1
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", [(4096, 14336), (16384, 8192)], ids=["4096x14336", "16384x8192"])
def test_glu_gpu(shape, op, dtype):
    fn, ref = OPS[op]
    check_op(fn, ref, [_t(shape, dtype, "cuda"), _t(shape, dtype, "cuda")], dtype, f"{op}[gpu]")


@pytest.mark.gpu
def test_glu_gpu_fused_halves_large():
    """tokens * intermediate > 2**31 elements in the fused tensor: int64 offsets in the strided path."""
    t, inter = 2**31 // (2 * 8192) + 5, 8192
    fused = torch.randn(t, 2 * inter, device="cuda", dtype=torch.bfloat16)
    y = swiglu(fused[:, :inter], fused[:, inter:])
    for r in (0, t - 1):
        g, u = fused[r, :inter], fused[r, inter:]
        assert_close(y[r], reference.swiglu(g.double(), u.double()), reference.swiglu(g, u), torch.bfloat16,
                     "output", f"row {r}")


# --- edge cases ---


def test_swiglu_large_magnitude_bf16(device):
    """silu(gate) * up with |gate| ~ 80 (exp(-gate) overflows fp32 past ~88): finite, as the reference."""
    gate = torch.linspace(-90, 90, 64, device=device).repeat(2, 1)
    up = torch.randn(2, 64, device=device)
    check_op(swiglu, reference.swiglu, [gate.bfloat16(), up.bfloat16()], torch.bfloat16, "swiglu |gate|~90")


# --- huge sizes (GPU): past 2**31 elements ---


@pytest.mark.gpu
@pytest.mark.usefixtures("free_cuda_memory")
def test_swiglu_numel_over_2_31():
    inter = HUGE_SIZES["inter"]
    rows = I32 // inter + HUGE_SIZES["inter_extra"]  # 149860 rows x 14336 = 2.15e9 elements
    assert rows * inter > I32
    gate = huge_randn(rows, inter).requires_grad_(True)
    up = huge_randn(rows, inter).requires_grad_(True)
    out = swiglu(gate, up)
    dout = huge_randn(rows, inter)
    out.backward(dout)
    huge_sync()
    for s in huge_slices(rows, I32 // inter, HUGE_SIZES["act_chunk"]):
        go, uo = (t.detach()[s].float().requires_grad_(True) for t in (gate, up))
        gb, ub = (t.detach()[s].clone().requires_grad_(True) for t in (gate, up))
        yo, yb = reference.swiglu(go, uo), reference.swiglu(gb, ub)
        yo.backward(dout[s].float())
        yb.backward(dout[s])
        assert_close(out.detach()[s], yo.detach(), yb.detach(), BF, "output", f"swiglu rows {s.start}:{s.stop}")
        assert_close(gate.grad[s], go.grad, gb.grad, BF, "grad", f"swiglu dgate rows {s.start}:{s.stop}")
        assert_close(up.grad[s], uo.grad, ub.grad, BF, "grad", f"swiglu dup rows {s.start}:{s.stop}")


# --- bad input ---


@pytest.mark.parametrize("case", case_params(case_ids(ERROR_CASES, "swiglu/", "geglu/", "gelu/")))
def test_bad_input_raises_naming_argument(case, device):
    check_error_case(case, device)


@pytest.mark.parametrize("case", case_params(case_ids(VIEW_IDS, "swiglu/", "geglu/", "gelu/")))
def test_views_give_correct_results(case, device):
    check_view_case(case, device)


@pytest.mark.parametrize("case", case_ids(ZERO_IDS, "swiglu/", "geglu/", "gelu/"), ids=case_ids(ZERO_IDS, "swiglu/", "geglu/", "gelu/"))
def test_zero_length_batches(case, device):
    check_zero_length_case(case, device)


# --- determinism ---


@pytest.mark.parametrize("case", ["swiglu", "geglu", "gelu"], ids=["swiglu", "geglu", "gelu"])
def test_bitwise_identical_gradients(case, device):
    check_bitwise_case(case, device, big=False, runs=2)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["swiglu", "geglu", "gelu"], ids=["swiglu", "geglu", "gelu"])
def test_bitwise_identical_gradients_gpu_real_size(case):
    """Many programs in flight (where atomics would reorder sums): three runs, bit-identical."""
    check_bitwise_case(case, "cuda", big=True, runs=3)
    torch.cuda.empty_cache()
