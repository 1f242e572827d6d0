"""rms_norm: forward and every gradient vs the fp64 oracle (tests/harness.check_op), flags both ways."""
import pytest
import torch

from hf_fastkern.kernels import reference
from hf_fastkern.kernels import rms_norm as rms_mod
from hf_fastkern.kernels._triton_utils import MAX_PROGS_PER_SM
from hf_fastkern.kernels.layer_norm import layer_norm
from hf_fastkern.kernels.rms_norm import rms_norm, rms_norm_fwd, sum_partials
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
from tests.tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]


def _x(shape, dtype, device):
    return torch.randn(shape, device=device).to(dtype)


def _w(hidden, dtype, device):
    # around 1, as trained norm weights are; random so dW errors are visible
    return (1.0 + 0.5 * torch.randn(hidden, device=device)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(3, 1), (5, 127), (2, 3, 1000), (2, 4097)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["llama", "gemma"])
def test_rms_norm_matches_reference(shape, dtype, mode, device):
    offset, cbw = (0.0, True) if mode == "llama" else (1.0, False)
    x, w = _x(shape, dtype, device), _w(shape[-1], dtype, device)
    check_op(lambda x, w: rms_norm(x, w, 1e-6, offset, cbw),
             lambda x, w: reference.rms_norm(x, w, 1e-6, offset, cbw), [x, w], dtype, f"rms_norm[{mode}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("cast_before_weight", [True, False], ids=["cast_first", "weight_first"])
@pytest.mark.parametrize("save_rstd_only", [True, False], ids=["save_rstd", "recompute_rstd"])
def test_rms_norm_flags(offset, cast_before_weight, save_rstd_only, dtype, device):
    x, w = _x((2, 3, 96), dtype, device), _w(96, dtype, device)
    check_op(lambda x, w: rms_norm(x, w, 1e-5, offset, cast_before_weight, save_rstd_only),
             lambda x, w: reference.rms_norm(x, w, 1e-5, offset, cast_before_weight), [x, w], dtype, "rms_norm")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("hidden", [1, 127])
def test_rms_norm_no_weight(hidden, dtype, device):
    check_op(lambda x: rms_norm(x, None), lambda x: reference.rms_norm(x, None), [_x((4, hidden), dtype, device)],
             dtype, "rms_norm[no weight]")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cast_before_weight", [True, False], ids=["cast_first", "weight_first"])
def test_rms_norm_fp32_weight_low_precision_input(dtype, cast_before_weight, device):
    """HF keeps fp32 norm weights under autocast: Llama order then returns fp32, Gemma order x.dtype."""
    x, w = _x((6, 200), dtype, device), _w(200, torch.float32, device)
    out = rms_norm(x, w, cast_before_weight=cast_before_weight)
    assert out.dtype == (torch.float32 if cast_before_weight else dtype)
    # Tolerances are judged at the input precision (the fp32 output carries x.dtype's rounding of x_hat).
    check_op(lambda x, w: rms_norm(x, w, 1e-6, 0.0, cast_before_weight),
             lambda x, w: reference.rms_norm(x, w, 1e-6, 0.0, cast_before_weight), [x, w], dtype, "rms_norm[fp32 w]")


def test_rms_norm_non_contiguous(device):
    base = _x((4, 6, 130), torch.float32, device)
    x = base.transpose(0, 1)[..., :100]  # strided rows and a non-viewable leading layout
    assert not x.is_contiguous()
    w = _w(100, torch.float32, device)
    check_op(lambda x, w: rms_norm(x, w), lambda x, w: reference.rms_norm(x, w), [x, w], torch.float32,
             "rms_norm[non-contiguous]")
    xs = _x((64, 3), torch.float32, device).t()  # last-dim stride != 1
    check_op(lambda x: rms_norm(x, None), lambda x: reference.rms_norm(x, None), [xs], torch.float32,
             "rms_norm[transposed]")


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64)], ids=["2d", "3d"])
def test_rms_norm_zero_tokens(shape, device):
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.ones(64, device=device, requires_grad=True)
    y = rms_norm(x, w)
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == shape
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_rms_norm_weight_without_grad(device):
    """Frozen weight (LoRA fine-tuning): only dx is computed, and it is still right."""
    x, w = _x((5, 64), torch.float32, device), _w(64, torch.float32, device)
    xk = x.clone().requires_grad_()
    rms_norm(xk, w).sum().backward()
    xr = x.double().requires_grad_()
    reference.rms_norm(xr, w.double()).sum().backward()
    torch.testing.assert_close(xk.grad.double(), xr.grad, rtol=0, atol=1e-5)


def test_rms_norm_bad_input(device):
    x = torch.randn(4, 64, device=device)
    with pytest.raises(ValueError, match=r"weight must have shape \(64,\)"):
        rms_norm(x, torch.ones(63, device=device))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        rms_norm(torch.ones(4, 64, dtype=torch.int32, device=device), None)
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        rms_norm(x, torch.ones(64, dtype=torch.int64, device=device))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            rms_norm(x.cuda(), torch.ones(64))
    else:
        with pytest.raises(ValueError, match="one device"):
            rms_norm(x, torch.ones(64, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("save_rstd_only", [True, False], ids=["save_rstd", "recompute_rstd"])
def test_rms_norm_custom_op_direct(save_rstd_only, dtype, device):
    """The torch.library op pair (what torch.compile runs) and its registered autograd, called eagerly."""
    x, w = _x((7, 130), dtype, device), _w(130, dtype, device)
    check_op(lambda x, w: rms_norm_fwd(x, w, 1e-6, 0.0, True, save_rstd_only)[0],
             lambda x, w: reference.rms_norm(x, w, 1e-6), [x, w], dtype, "rms_norm_fwd[op]")


def test_rms_norm_torch_compile_fullgraph(device):
    """The custom op traces under torch.compile(fullgraph=True): forward and backward through it."""
    x = _x((4, 64), torch.float32, device).requires_grad_()
    w = _w(64, torch.float32, device).requires_grad_()
    fn = torch.compile(lambda x, w: rms_norm(x, w) * 2.0, fullgraph=True, backend="aot_eager")
    y = fn(x, w)
    torch.testing.assert_close(y, 2.0 * reference.rms_norm(x.detach(), w.detach()), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and w.grad is not None


# ----------------------------------------------------------------------------------------------------------
# the dW partial-sum reduction (one launch replacing slice + sum + cast) and the host-cost fast paths


def _partials(n_part, hidden, device, spare=3):
    # rows past n_part are NaN: the reduction must never read them
    part = torch.randn(n_part + spare, hidden, device=device)
    part[n_part:] = float("nan")
    return part


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("hidden", [1, 63, 1025])
@pytest.mark.parametrize("n_part", [1, 17, 100])
def test_sum_partials(n_part, hidden, out_dtype, device):
    part = _partials(n_part, hidden, device)
    out = torch.full((hidden,), float("nan"), dtype=out_dtype, device=device)
    sum_partials(part, n_part, out)
    assert_close(out, part[:n_part].double().sum(0), part[:n_part].sum(0).to(out_dtype), out_dtype, "output",
                 f"sum_partials[{n_part}x{hidden}]")


@pytest.mark.parametrize("n_part,hidden", [(1, 33), (5, 8193), (40, 200)], ids=["1x33", "5x8193", "40x200"])
def test_sum_partials_two_outputs(n_part, hidden, device):
    """layer_norm's dW and dB in one launch, each rounded to its own parameter dtype."""
    p1, p2 = _partials(n_part, hidden, device), _partials(n_part, hidden, device, spare=1)
    o1 = torch.full((hidden,), float("nan"), dtype=torch.bfloat16, device=device)
    o2 = torch.full((hidden,), float("nan"), dtype=torch.float32, device=device)
    sum_partials(p1, n_part, o1, p2, o2)
    for p, o in ((p1, o1), (p2, o2)):
        assert_close(o, p[:n_part].double().sum(0), p[:n_part].sum(0).to(o.dtype), o.dtype, "output",
                     f"sum_partials[two outputs, {o.dtype}]")


def test_sum_partials_deterministic(device):
    part = _partials(64, 300, device)
    a, b = torch.empty(300, device=device), torch.empty(300, device=device)
    sum_partials(part, 64, a)
    sum_partials(part, 64, b)
    assert torch.equal(a, b)


def _tuned_launch_twice(shape: tuple, device) -> list[tuple]:
    """Forget the remembered configs, then run bf16 rms_norm forward + backward twice on the same inputs: the
    first call goes through the autotuner, the second launches the chosen config (TunedLaunch). Returns
    [(y, dx, dw)] per run."""
    rms_mod._FWD._chosen.clear()
    rms_mod._BWD._chosen.clear()
    x, w = _x(shape, torch.bfloat16, device), _w(shape[-1], torch.bfloat16, device)
    dy = torch.randn(shape, device=device).to(torch.bfloat16)
    runs = []
    for _ in range(2):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = rms_norm(xl, wl)
        y.backward(dy)
        runs.append((y, xl.grad, wl.grad))
    return runs


def test_rms_norm_tuned_launch_reuses_config(device):
    """The first launch per key goes through the autotuner, later ones launch the remembered config directly
    (TunedLaunch): both paths give bitwise-equal outputs and gradients."""
    runs = _tuned_launch_twice((3, 5, 96), device)
    assert len(rms_mod._FWD._chosen) == 1 and len(rms_mod._BWD._chosen) == 1
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(2, 3, 64), (6, 64)], ids=["3d", "2d"])
def test_rms_norm_one_autograd_node(shape, device):
    """Host cost: leading dimensions are flattened inside the autograd.Function, so the graph holds one node
    (no ViewBackward before and after it, each of which costs engine time in every backward)."""
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.ones(64, device=device, requires_grad=True)
    y = rms_norm(x, w)
    assert y.shape == shape and y.is_contiguous()
    leaves = [type(fn).__name__ for fn, _ in y.grad_fn.next_functions if fn is not None]
    assert leaves == ["AccumulateGrad", "AccumulateGrad"], f"{type(y.grad_fn).__name__} -> {leaves}"


@pytest.mark.parametrize("norm", ["rms_norm", "layer_norm"])
def test_norm_without_autograd_skips_the_node(norm, device, monkeypatch):
    """No graph to record (generate(), eval): the launcher runs without the autograd.Function, with the output
    the Function path gives, bitwise; with a graph, or under forward-mode AD (dual tensors do not require grad),
    the Function runs."""
    import hf_fastkern.kernels.layer_norm as ln_mod

    x = torch.randn(3, 5, 64, device=device, dtype=torch.bfloat16)
    w = torch.randn(64, device=device, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(64, device=device, dtype=torch.bfloat16, requires_grad=True)
    fn = (lambda: rms_norm(x, w)) if norm == "rms_norm" else (lambda: layer_norm(x, w, b))
    func = rms_mod.RMSNormFunction if norm == "rms_norm" else ln_mod.LayerNormFunction
    applied = []
    real_apply = func.apply
    monkeypatch.setattr(func, "apply", lambda *a: applied.append(1) or real_apply(*a))
    with torch.no_grad():
        y0 = fn()
    assert applied == []
    y1 = fn()
    assert applied == [1] and y1.grad_fn is not None
    assert torch.equal(y0, y1.detach())
    import torch.autograd.forward_ad as fwad
    with torch.no_grad(), fwad.dual_level():
        x = fwad.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="jvp"):  # the Function says it has no jvp: loud, not a lost tangent
            fn()


# ----------------------------------------------------------------------------------------------------------
# GPU: real sizes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("hidden", [2048, 4096, 8192])
@pytest.mark.parametrize("tokens", [4096, 65536])
def test_rms_norm_gpu(tokens, hidden, dtype):
    if tokens * hidden > 2**28 and dtype == torch.float32:
        tokens //= 4  # keep the fp64 oracle within memory
    x, w = _x((tokens, hidden), dtype, "cuda"), _w(hidden, dtype, "cuda")
    check_op(lambda x, w: rms_norm(x, w), lambda x, w: reference.rms_norm(x, w), [x, w], dtype, "rms_norm[gpu]")


@pytest.mark.gpu
def test_rms_norm_gpu_gemma_and_compile():
    x, w = _x((8192, 4096), torch.bfloat16, "cuda"), _w(4096, torch.bfloat16, "cuda")
    check_op(lambda x, w: rms_norm(x, w, 1e-6, 1.0, False), lambda x, w: reference.rms_norm(x, w, 1e-6, 1.0, False),
             [x, w], torch.bfloat16, "rms_norm[gpu gemma]")
    fn = torch.compile(lambda x, w: rms_norm(x, w), fullgraph=True)
    torch.testing.assert_close(fn(x, w), rms_norm(x, w), rtol=0, atol=0)


@pytest.mark.gpu
def test_rms_norm_gpu_int64_offsets():
    """tokens * hidden > 2**31: row offsets must be int64 (bf16, ~4.3 GB)."""
    hidden = 4096
    tokens = 2**31 // hidden + 3
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = rms_norm(x, w)
    for r in (0, tokens // 2, tokens - 1):
        xr = x[r:r + 1]
        assert_close(y[r:r + 1], reference.rms_norm(xr.double(), w.detach().double()),
                     reference.rms_norm(xr, w.detach()), torch.bfloat16, "output", f"row {r}")
    x.requires_grad_()
    y = rms_norm(x, w)
    dy = torch.zeros_like(y)
    dy[-1] = 1.0
    y.backward(dy)
    xr = x[-1:].detach().double().requires_grad_()
    reference.rms_norm(xr, w.detach().double()).backward(dy[-1:].double())
    xb = x[-1:].detach().clone().requires_grad_()
    reference.rms_norm(xb, w.detach()).backward(dy[-1:])
    assert_close(x.grad[-1:], xr.grad, xb.grad, torch.bfloat16, "grad", "last row dx")
    assert x.grad[0].abs().max().item() == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("hidden", [2048, 4096, 8192, 14336])
def test_sum_partials_gpu(hidden, out_dtype):
    """The real partial counts: up to SMs x MAX_PROGS_PER_SM rows (1056 on an H100)."""
    n_part = torch.cuda.get_device_properties(0).multi_processor_count * MAX_PROGS_PER_SM
    part = _partials(n_part, hidden, "cuda")
    out = torch.full((hidden,), float("nan"), dtype=out_dtype, device="cuda")
    sum_partials(part, n_part, out)
    assert_close(out, part[:n_part].double().sum(0), part[:n_part].sum(0).to(out_dtype), out_dtype, "output",
                 f"sum_partials[gpu {n_part}x{hidden}]")


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [2048, 4096])
def test_rms_norm_gpu_tuned_launch_bitwise(hidden):
    """A fresh key: the first call autotunes (several configs under pytest), the second launches the chosen
    config directly; dx and dW must be bitwise equal (same config, same partial count, fixed-order reduce)."""
    runs = _tuned_launch_twice((8192, hidden), "cuda")
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --- edge cases ---


@pytest.mark.parametrize("dtype", ALL, ids=dtype_ids(ALL))
def test_norms_all_zero_row(dtype, device):
    hidden = 37
    x = torch.randn(4, hidden, device=device)
    x[1] = 0.0
    x[3] = 0.0
    w = torch.randn(hidden, device=device).to(dtype)
    b = torch.randn(hidden, device=device).to(dtype)
    check_op(lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: reference.rms_norm(x, w, 1e-6),
             [x.to(dtype), w], dtype, "rms_norm zero row")
    check_op(lambda x, w, b: layer_norm(x, w, b, 1e-5), lambda x, w, b: reference.layer_norm(x, w, b, 1e-5),
             [x.to(dtype), w, b], dtype, "layer_norm zero row")


@pytest.mark.parametrize("dtype", ALL, ids=dtype_ids(ALL))
@pytest.mark.parametrize("eps_kind", ["zero", "tiny", "dtype_eps"])
@pytest.mark.parametrize("op", ["rms_norm"])
def test_norm_eps_at_dtype_limit(op, eps_kind, dtype, device):
    """eps = 0, finfo(dtype).tiny, finfo(dtype).eps with a zero row and a constant row (tests/harness.py)."""
    check_norm_eps_at_dtype_limit(op, eps_kind, dtype, device)


# --- huge sizes (GPU): past 2**31 elements ---


@pytest.mark.gpu
@pytest.mark.usefixtures("free_cuda_memory")
@pytest.mark.parametrize("op", ["rms_norm"])
def test_norm_tokens_times_hidden_over_2_31(op):
    check_norm_tokens_times_hidden_over_2_31(op)


# --- bad input ---


@pytest.mark.parametrize("case", case_params(case_ids(ERROR_CASES, "rms_norm/")))
def test_bad_input_raises_naming_argument(case, device):
    check_error_case(case, device)


@pytest.mark.parametrize("case", case_params(case_ids(VIEW_IDS, "rms_norm/")))
def test_views_give_correct_results(case, device):
    check_view_case(case, device)


@pytest.mark.parametrize("case", case_ids(ZERO_IDS, "rms_norm/"), ids=case_ids(ZERO_IDS, "rms_norm/"))
def test_zero_length_batches(case, device):
    check_zero_length_case(case, device)


# --- determinism ---


@pytest.mark.parametrize("case", ["rms_norm"], ids=["rms_norm"])
def test_bitwise_identical_gradients(case, device):
    check_bitwise_case(case, device, big=False, runs=2)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["rms_norm"], ids=["rms_norm"])
def test_bitwise_identical_gradients_gpu_real_size(case):
    """Many programs in flight (where atomics would reorder sums): three runs, bit-identical."""
    check_bitwise_case(case, "cuda", big=True, runs=3)
    torch.cuda.empty_cache()


def test_autotune_helper_refuses_hooks_and_budgets_its_benchmark(monkeypatch):
    """_triton_utils.autotune: hooks that a disk-cached tuning could not replay are refused; where the installed
    Triton takes them, the package's per-config benchmark and (unless HF_FASTKERN_AUTOTUNE_CACHE=0) cache_results
    are passed."""
    from hf_fastkern.kernels import _triton_utils as tu

    for hook in ("reset_to_zero", "restore_value", "pre_hook"):
        with pytest.raises(ValueError, match=hook):
            tu.autotune([], key=[], **{hook: ["X"] if hook != "pre_hook" else (lambda args: None)})
    seen = {}
    monkeypatch.setattr(tu.triton, "autotune", lambda **kw: seen.update(kw))
    tu.autotune(["cfg"], key=["n"])
    assert seen["configs"] == ["cfg"] and seen["key"] == ["n"]
    assert ("do_bench" in seen) == ("do_bench" in tu._AUTOTUNE_PARAMS)
    assert seen.get("cache_results", False) == ("cache_results" in tu._AUTOTUNE_PARAMS and tu.AUTOTUNE_CACHE)
    monkeypatch.setattr(tu, "AUTOTUNE_CACHE", False)
    seen.clear()
    tu.autotune(["cfg"], key=["n"])
    assert "cache_results" not in seen
