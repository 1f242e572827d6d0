"""SwiGLU ``silu(gate) * up``, GeGLU ``gelu(gate) * up`` (erf or tanh GELU) and plain GELU in Triton.

Semantics are exactly ``reference.swiglu/geglu/gelu``: computed in fp32, rounded once to the input dtype.
Registered as ``hf_fastkern::glu_act_fwd`` / ``glu_act_bwd`` (one pair for the three ops, the activation is
an integer argument) so torch.compile traces through them.

Design: pure bandwidth, 16-byte vector accesses. When gate/up are contiguous each program handles ``BLOCK``
consecutive elements of the flat tensor; when they are strided row views, e.g. the two halves
``fused[..., :I]`` / ``fused[..., I:]`` of one gate_up projection, each program handles ``BLOCK`` columns of
one row and applies the row stride, so no copy is made. The output and the gradients are contiguous.
The backward recomputes the activation from gate (never stores it): it reads gate, up, dy and writes
dgate, dup, the traffic floor. Offsets are int64 (tokens * intermediate may exceed 2**31).
"""
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hf_fastkern.kernels import reference, routing
from hf_fastkern.kernels._triton_utils import TunedLaunch, autotune, cdiv, next_pow2, round_to, tune_configs
from hf_fastkern.kernels.dispatch import (
    PerShape,
    check_floating,
    check_same_device,
    check_same_shape,
    device_check,
    entry_key,
    use_kernel,
)
from hf_fastkern.kernels.routing import leading_rows, records_grad

# Activation codes (constexpr in the kernels).
SILU, GELU_ERF, GELU_TANH = 0, 1, 2
_GELU_CODES = {"none": GELU_ERF, "tanh": GELU_TANH}


def size_class(n: int) -> int:
    """Autotune bucket for the element count: small tensors favour small blocks, large ones big blocks."""
    return 0 if n < 2**20 else (1 if n < 2**24 else 2)


def prune_blocks(configs, named_args, **kwargs):
    """Drop blocks larger than what one tile spans (the tensor, or a row when strided): masked-off lanes."""
    n = named_args["n_elements"] if kwargs.get("CONTIG", True) else named_args["n_cols"]
    kept = [c for c in configs if c.kwargs["BLOCK"] <= max(next_pow2(n), 1024)]
    return kept or configs[:1]


ACT_CONFIGS = tune_configs(
    [triton.Config({"BLOCK": b}, num_warps=w) for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16)
     if b // (32 * w) >= 8],
    [triton.Config({"BLOCK": 1024}, num_warps=4), triton.Config({"BLOCK": 4096}, num_warps=8)])


# ----------------------------------------------------------------------------------------------------------
# jit helpers: activation and its derivative in fp32


@triton.jit
def _tanh_parts(z):
    """(1 + tanh z, 1 - tanh(z)**2) without cancellation: through q = 1 / (exp(2|z|) + 1) in (0, 1/2],
    1 + tanh z is 2 - 2q or 2q, and 1 - tanh**2 is 4q(1 - q). (tl has no tanh in every supported Triton.)
    exp(-2|z|) only underflows, never overflows."""
    e = tl.exp(-2.0 * tl.abs(z))
    q = e / (1.0 + e)
    return tl.where(z >= 0, 2.0 - 2.0 * q, 2.0 * q), 4.0 * q * (1.0 - q)


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:
        return g * tl.sigmoid(g)
    elif ACT == 1:
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    else:
        one_plus_t, _ = _tanh_parts(0.7978845608028654 * (g + 0.044715 * g * g * g))
        return 0.5 * g * one_plus_t


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    """(act(g), d act / d g), fp32."""
    if ACT == 0:
        s = tl.sigmoid(g)
        return g * s, s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * g * g)
        return g * cdf, cdf + g * pdf
    else:
        one_plus_t, sech2 = _tanh_parts(0.7978845608028654 * (g + 0.044715 * g * g * g))
        dt = 0.7978845608028654 * (1.0 + 0.134145 * g * g) * sech2
        return 0.5 * g * one_plus_t, 0.5 * one_plus_t + 0.5 * g * dt


# ----------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _tile(n_elements, n_cols, stride_g, stride_u, CONTIG: tl.constexpr, BLOCK: tl.constexpr):
    """(gate offsets, up offsets, output offsets, mask) of this program's tile, int64.
    Contiguous: a flat 1-D tile. Strided rows: program (row, column block), so each tile is contiguous in
    memory and the compiler can still prove 16-byte vector accesses (row * stride is a multiple of 16)."""
    if CONTIG:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        return offs, offs, offs, offs < n_elements
    else:
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        return row * stride_g + cols, row * stride_u + cols, row * n_cols + cols, cols < n_cols


# n_elements and n_cols stay specialised (divisibility by 16 only, a handful of variants): the masks must be
# provably uniform over 8-element groups for the loads and stores to vectorise.
@autotune(ACT_CONFIGS, key=["n_size_class", "ACT", "HAS_UP", "CONTIG"],
           prune_configs_by={"early_config_prune": prune_blocks})
@triton.jit(do_not_specialize=["n_size_class"])
def _glu_fwd_kernel(G, U, Y, n_elements, n_cols, n_size_class, stride_g, stride_u,
                    ACT: tl.constexpr, HAS_UP: tl.constexpr, CONTIG: tl.constexpr, BLOCK: tl.constexpr):
    og, ou, oy, mask = _tile(n_elements, n_cols, stride_g, stride_u, CONTIG, BLOCK)
    g = tl.load(G + og, mask=mask, other=0.0).to(tl.float32)
    y = _act(g, ACT)
    if HAS_UP:
        y = y * tl.load(U + ou, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + oy, round_to(y, Y.dtype.element_ty), mask=mask)


@autotune(ACT_CONFIGS, key=["n_size_class", "ACT", "HAS_UP", "CONTIG"],
           prune_configs_by={"early_config_prune": prune_blocks})
@triton.jit(do_not_specialize=["n_size_class"])
def _glu_bwd_kernel(DY, G, U, DG, DU, n_elements, n_cols, n_size_class, stride_g, stride_u,
                    ACT: tl.constexpr, HAS_UP: tl.constexpr, CONTIG: tl.constexpr, BLOCK: tl.constexpr):
    og, ou, oy, mask = _tile(n_elements, n_cols, stride_g, stride_u, CONTIG, BLOCK)
    dy = tl.load(DY + oy, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + og, mask=mask, other=0.0).to(tl.float32)
    # recompute the activation instead of having saved it: free in a bandwidth-bound kernel
    a, da = _act_and_grad(g, ACT)
    if HAS_UP:
        u = tl.load(U + ou, mask=mask, other=0.0).to(tl.float32)
        tl.store(DU + oy, round_to(dy * a, DU.dtype.element_ty), mask=mask)
        dg = dy * u * da
    else:
        dg = dy * da
    tl.store(DG + oy, round_to(dg, DG.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# launchers: plain functions, registered as torch.library custom ops (traced by torch.compile) and called
# directly by the eager autograd.Function (less host overhead than custom-op dispatch; see rms_norm.py).


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A [rows, cols] view with unit column stride (copies only when that is impossible)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


_FWD = TunedLaunch(_glu_fwd_kernel)
_BWD = TunedLaunch(_glu_bwd_kernel)


def _grid(n: int, rows: int, cols: int, contig: bool, cfg: Optional[dict]):
    """The launch grid: a tuple once the config for this launch is known, else a function of it (the
    autotuner's first call tries several BLOCKs)."""
    if cfg is not None:
        block = cfg["BLOCK"]
        return (cdiv(n, block),) if contig else (rows, cdiv(cols, block))
    if contig:
        return lambda meta: (cdiv(n, meta["BLOCK"]),)
    return lambda meta: (rows, cdiv(cols, meta["BLOCK"]))


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _glu_act_fwd_impl(gate: torch.Tensor, up: Optional[torch.Tensor], act: int) -> torch.Tensor:
    """gate, up: [..., cols] one dtype (any row strides). Returns ``act(gate) * up`` (or ``act(gate)``) as a
    contiguous tensor of gate's shape and dtype. act: 0 SiLU, 1 erf GELU, 2 tanh GELU."""
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    if n == 0:
        return out
    g2 = _as_rows(gate)
    u2 = _as_rows(up) if up is not None else g2
    cols = g2.shape[1]
    sg, su = _row_stride(g2), _row_stride(u2)
    contig = sg == cols and su == cols
    sc = size_class(n)
    key = (sc, act, up is not None, contig, gate.dtype, u2.dtype)
    _FWD(key, _grid(n, g2.shape[0], cols, contig, _FWD.chosen(key)), g2, u2, out, n, cols, sc, sg, su,
         ACT=act, HAS_UP=up is not None, CONTIG=contig)
    return out


glu_act_fwd = torch.library.custom_op("hf_fastkern::glu_act_fwd", mutates_args=())(_glu_act_fwd_impl)


@glu_act_fwd.register_fake
def _(gate, up, act):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


def _glu_act_bwd_impl(dy: torch.Tensor, gate: torch.Tensor, up: Optional[torch.Tensor],
                act: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dy: [..., cols] like gate. Returns (dgate, dup) contiguous in gate's dtype; dup is empty without up."""
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(gate.shape if up is not None else (0,), dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    if n == 0:
        return dg, du
    dy = dy.contiguous()
    g2 = _as_rows(gate)
    u2 = _as_rows(up) if up is not None else g2
    cols = g2.shape[1]
    sg, su = _row_stride(g2), _row_stride(u2)
    contig = sg == cols and su == cols
    sc = size_class(n)
    key = (sc, act, up is not None, contig, gate.dtype, u2.dtype, dy.dtype)
    _BWD(key, _grid(n, g2.shape[0], cols, contig, _BWD.chosen(key)),
         dy, g2, u2, dg, du if up is not None else dg, n, cols, sc, sg, su,
         ACT=act, HAS_UP=up is not None, CONTIG=contig)
    return dg, du


glu_act_bwd = torch.library.custom_op("hf_fastkern::glu_act_bwd", mutates_args=())(_glu_act_bwd_impl)


@glu_act_bwd.register_fake
def _(dy, gate, up, act):
    du = torch.empty(gate.shape if up is not None else (0,), dtype=gate.dtype, device=gate.device)
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device), du


def _grads(ctx, dy, bwd):
    gate, up = ctx.saved_tensors
    dg, du = bwd(dy, gate, up, ctx.act)
    return dg, (du if up is not None else None), None


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.act = inputs[2]


glu_act_fwd.register_autograd(lambda ctx, dy: _grads(ctx, dy, glu_act_bwd), setup_context=_setup_context)


class GLUActFunction(torch.autograd.Function):
    """Eager autograd path over the same launchers as the custom ops (saves gate and up, not the output)."""

    @staticmethod
    def forward(ctx, gate, up, act):
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return _glu_act_fwd_impl(gate, up, act)

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, _glu_act_bwd_impl)


def _apply(gate: torch.Tensor, up: Optional[torch.Tensor], act: int) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return glu_act_fwd(gate, up, act)
    return GLUActFunction.apply(gate, up, act)


# ----------------------------------------------------------------------------------------------------------
# public entries


def _check_pair(op: str, gate: torch.Tensor, up: torch.Tensor) -> None:
    check_floating("gate", gate)
    check_floating("up", up)
    check_same_device(gate=gate, up=up)
    check_same_shape(gate=gate, up=up)
    if gate.dim() == 0:
        raise ValueError(f"{op}: gate and up must have at least one dimension [..., intermediate], got 0-d")
    if gate.dtype != up.dtype:
        raise TypeError(f"{op}: gate and up must have one dtype, got gate {gate.dtype} and up {up.dtype}")


def _check_approximate(approximate: str) -> int:
    if approximate not in _GELU_CODES:
        raise ValueError(f"approximate must be 'none' (erf GELU) or 'tanh' (gelu_new), got {approximate!r}")
    return _GELU_CODES[approximate]


def glu_routed(gate: torch.Tensor, up: torch.Tensor | None, intermediate: int | None = None) -> bool:
    """Does the routing table send this SwiGLU/GeGLU (gate [..., I], or gate_up [..., 2I] with up None) to the
    kernel? (hf_fastkern.kernels.routing: CPU tensors always run it.) ``intermediate`` given: ``gate`` is the
    MLP's input [..., hidden] and I is ``intermediate`` (the decision before the projections run)."""
    n = intermediate if intermediate is not None else gate.shape[-1] if up is not None else gate.shape[-1] // 2
    return routing.use_kernel("glu", gate.device, tokens=leading_rows(gate), intermediate=n,
                              grad=records_grad(gate, up))


def gelu_routed(x: torch.Tensor) -> bool:
    """Does the routing table send this plain GELU (GPT-2, GPT-NeoX MLPs) to the kernel? The shipped H100 table has
    no ``gelu`` rule (bench_routing measured the kernel at 0.11-1.0x ``F.gelu``, docs/routing.md), so there it
    runs ``F.gelu`` (the Triton launch only added host time, e.g. to every GPT-NeoX decoding step); CPU tensors
    run the kernel."""
    return routing.use_kernel("gelu", x.device, tokens=leading_rows(x), features=x.shape[-1] if x.dim() else 1,
                              grad=records_grad(x))


# validation and the kernel/reference decision, once per call signature (dispatch.entry_key)
_ENTRY = PerShape()


_REFERENCE, _KERNEL, _STOCK = 0, 1, 2


def _glu_entry(op: str, gate: torch.Tensor, up: torch.Tensor) -> int:
    """Validate (raises on bad input) and decide, once per op and signature: _KERNEL, _STOCK (the routing table
    keeps this case on PyTorch) or _REFERENCE (the kernel cannot take it: dtype, device, forced reference)."""
    key = entry_key(gate, up)
    if key is not None:
        key = (op, key)
    path = _ENTRY.get(key)
    if path is None:
        _check_pair(op, gate, up)
        if not use_kernel(op, device_check((gate, up))):
            path = _REFERENCE
        else:
            path = _KERNEL if glu_routed(gate, up) else _STOCK
        _ENTRY.put(key, path)
    return path


# Routed to stock, the gated activations run what transformers' MLPs run: ``act(gate) * up`` in the inputs' dtype
# (two elementwise passes, autograd saving what the unpatched model saves), not the fp32 reference (five passes
# and fp32 copies saved for backward).


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``. gate, up: [..., intermediate] of one shape and dtype (fp32/bf16/fp16), any row
    strides (e.g. the halves of a fused gate_up projection). Returns a contiguous tensor, gate's dtype."""
    path = _glu_entry("swiglu", gate, up)
    if path == _STOCK:
        return F.silu(gate) * up
    if path == _REFERENCE:
        return reference.swiglu(gate, up)
    return _apply(gate, up, SILU)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(gate) * up``; ``approximate='none'`` is the erf GELU, ``'tanh'`` GPT-2's ``gelu_new``.
    gate, up: [..., intermediate] of one shape and dtype. Returns gate's dtype."""
    code = _check_approximate(approximate)
    path = _glu_entry("geglu", gate, up)
    if path == _STOCK:
        return F.gelu(gate, approximate=approximate) * up
    if path == _REFERENCE:
        return reference.geglu(gate, up, approximate)
    return _apply(gate, up, code)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU of x: [...] fp32/bf16/fp16 (erf, or tanh with ``approximate='tanh'``). Returns x.dtype."""
    code = _check_approximate(approximate)
    check_floating("x", x)
    if not use_kernel("gelu", device_check((x,))):
        return reference.gelu(x, approximate)
    if not gelu_routed(x):
        # one F.gelu pass in x's dtype (fp32 math inside, one rounding: the same values as reference.gelu without
        # its two casts). GPT-NeoX's "gelu" runs exactly this; GPT-2's gelu_new (NewGELUActivation) computes the
        # same tanh formula in several passes of x's dtype, so its values differ by roundings.
        return F.gelu(x, approximate=approximate)
    if x.dim() == 0:
        return _apply(x.reshape(1), None, code).reshape(())
    return _apply(x, None, code)
