"""cross_entropy and fused_linear_cross_entropy vs reference.cross_entropy / reference.linear_cross_entropy.

CPU: the Triton kernels run in the interpreter at tiny sizes (odd token counts, vocabularies 1000 and 32001,
chunks that do not divide the tokens). GPU (``-m gpu``): real sizes, including tokens x vocab > 2**31.
Tolerances come from tests/tolerances.py; PyTorch's same-dtype baseline is what HF does: logits from a
``dtype`` matmul, then the loss in fp32.
"""
import pytest
import torch
import torch.nn.functional as F

from hf_fastkern.kernels import cross_entropy as ce_mod
from hf_fastkern.kernels import reference
from hf_fastkern.kernels.cross_entropy import (
    CEFunction,
    FLCEFunction,
    check_label_range,
    cross_entropy,
    default_chunk,
    fused_linear_cross_entropy,
    resolve_label_checks,
)
from tests.harness import (
    ALL,
    BF,
    ERROR_CASES,
    HUGE_DEV,
    HUGE_SIZES,
    I32,
    VIEW_IDS,
    ZERO_IDS,
    H,
    case_ids,
    case_params,
    check_bitwise_case,
    check_error_case,
    check_op,
    check_view_case,
    check_zero_length_case,
    dtype_ids,
    huge_randn,
    huge_slices,
    huge_sync,
    r,
    raises_naming,
)
from tests.tolerances import assert_close

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]

# (id, options, bias)
CASES = [
    ("mean", {}, False),
    ("sum", {"reduction": "sum"}, False),
    ("none", {"reduction": "none"}, False),
    ("ignore_index_7", {"ignore_index": 7, "reduction": "none"}, False),
    ("label_smoothing", {"label_smoothing": 0.1}, False),
    ("z_loss", {"z_loss": 1e-2, "reduction": "sum"}, False),
    ("softcap", {"softcap": 3.0}, False),
    ("bias", {}, True),
    ("num_items_in_batch", {"num_items_in_batch": 50}, False),
    ("all_options_none", {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 5.0, "reduction": "none"}, True),
]


def _labels(n, vocab, ignore_index=-100, every=5):
    y = torch.randint(0, vocab, (n,))
    y[::every] = ignore_index
    return y


def _baseline_linear(y, opts):
    """PyTorch's same-dtype path (what HF's ForCausalLMLoss does): dtype logits, fp32 loss."""
    return lambda h, w, b=None: reference.cross_entropy(F.linear(h, w, b), y, **opts)


def _flce_inputs(n, hdim, vocab, dtype, bias, device):
    h = torch.randn(n, hdim, device=device).to(dtype)
    # logits of order 1-3, like a trained head
    w = (torch.randn(vocab, hdim, device=device) / hdim**0.5 * 2).to(dtype)
    b = (torch.randn(vocab, device=device) * 0.5).to(dtype) if bias else None
    return h, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,opts,bias", [pytest.param(*c, id=c[0]) for c in CASES])
@pytest.mark.parametrize("chunk", [16, None], ids=["chunks", "one_chunk"])
def test_fused_linear_cross_entropy(case, opts, bias, dtype, device, chunk):
    n, hdim, vocab = 37, 24, 1000
    y = _labels(n, vocab, opts.get("ignore_index", -100)).to(device)
    h, w, b = _flce_inputs(n, hdim, vocab, dtype, bias, device)
    # chunk 16 does not divide 37 tokens: the last chunk is partial; None: the default, one chunk of all 37 (the
    # loop's one-chunk path, on the whole tensors)
    kern = lambda h, w, b=None: fused_linear_cross_entropy(h, w, y, b, chunk_size=chunk, **opts)
    ref = lambda h, w, b=None: reference.linear_cross_entropy(h, w, y, b, **opts)
    inputs = [h, w] + ([b] if bias else [])
    check_op(kern, ref, inputs, dtype, f"flce[{case}]", baseline_fn=_baseline_linear(y, opts))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1000, 32001])
def test_fused_linear_cross_entropy_vocab_sizes(vocab, dtype, device):
    n, hdim = 9, 16
    y = _labels(n, vocab, every=4).to(device)
    h, w, _ = _flce_inputs(n, hdim, vocab, dtype, False, device)
    kern = lambda h, w: fused_linear_cross_entropy(h, w, y, chunk_size=4)
    ref = lambda h, w: reference.linear_cross_entropy(h, w, y)
    check_op(kern, ref, [h, w], dtype, f"flce[V={vocab}]", baseline_fn=_baseline_linear(y, {}))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,opts,bias", [pytest.param(*c, id=c[0]) for c in CASES if not c[2]])
def test_cross_entropy(case, opts, bias, dtype, device):
    n, vocab = 21, 1000
    y = _labels(n, vocab, opts.get("ignore_index", -100)).to(device)
    logits = (torch.randn(n, vocab, device=device) * 2).to(dtype)
    check_op(lambda z: cross_entropy(z, y, **opts), lambda z: reference.cross_entropy(z, y, **opts), [logits],
             dtype, f"ce[{case}]")


def test_cross_entropy_leading_dims(device):
    logits = torch.randn(2, 5, 300, device=device)
    y = torch.randint(0, 300, (2, 5), device=device)
    out = cross_entropy(logits, y, reduction="none")
    assert out.shape == (2, 5)
    assert_close(out, reference.cross_entropy(logits.reshape(10, 300).double(), y.reshape(10),
                                              reduction="none").reshape(2, 5), None, torch.float32)


def test_fused_linear_cross_entropy_leading_dims(device):
    h, w, _ = _flce_inputs(6, 8, 100, torch.float32, False, device)
    y = torch.randint(0, 100, (6,), device=device)
    out = fused_linear_cross_entropy(h.reshape(2, 3, 8), w, y.reshape(2, 3), reduction="none")
    assert out.shape == (2, 3)
    ref = reference.linear_cross_entropy(h.double(), w.double(), y, reduction="none")
    assert_close(out.reshape(6), ref, None, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_matches_torch(reduction, device):
    """A batch whose labels are all ignored: 'mean' is NaN (0/0) like torch, 'sum' 0; gradients are zero."""
    n, hdim, vocab = 8, 16, 200
    y = torch.full((n,), -100, device=device)
    h, w, _ = _flce_inputs(n, hdim, vocab, torch.float32, False, device)
    h.requires_grad_(True)
    w.requires_grad_(True)
    out = fused_linear_cross_entropy(h, w, y, reduction=reduction)
    ht, wt = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    expect = F.cross_entropy(ht @ wt.t(), y, reduction=reduction)
    assert torch.equal(torch.isnan(out), torch.isnan(expect))
    assert torch.equal(out.nan_to_num(), expect.nan_to_num())
    g = torch.ones_like(out)
    out.backward(g)
    expect.backward(g)
    for a, b in ((h.grad, ht.grad), (w.grad, wt.grad)):
        assert not torch.isnan(a).any()
        assert torch.equal(a, torch.zeros_like(a)) and torch.equal(b.nan_to_num(), torch.zeros_like(b))
    z = (ht @ wt.t()).detach().requires_grad_()
    out_ce = cross_entropy(z, y, reduction=reduction)
    assert torch.equal(out_ce.nan_to_num(), expect.nan_to_num()) and torch.equal(out_ce.isnan(), expect.isnan())
    out_ce.backward(g)
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("fn", ["flce", "ce"])
def test_label_out_of_range_raises(fn, device):
    n, hdim, vocab = 6, 8, 50
    h, w, _ = _flce_inputs(n, hdim, vocab, torch.float32, False, device)
    y = torch.randint(0, vocab, (2, 3), device=device)
    y[0, 0] = -100
    y[1, 2] = vocab  # one past the end
    call = ((lambda y: fused_linear_cross_entropy(h.reshape(2, 3, hdim), w, y)) if fn == "flce"
            else (lambda y: cross_entropy((h @ w.t()).reshape(2, 3, vocab), y)))
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = 50 is out of range"):
        call(y)
    y[1, 2] = -3
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = -3"):
        call(y)


def test_label_out_of_range_unchecked_is_nan(device, monkeypatch):
    """With the check skipped, a bad label never reads out of bounds: its loss is NaN."""
    monkeypatch.setenv("HF_FASTKERN_SKIP_LABEL_CHECK", "1")
    h, w, _ = _flce_inputs(4, 8, 50, torch.float32, False, device)
    y = torch.tensor([1, 2, 999, 3], device=device)
    out = fused_linear_cross_entropy(h, w, y, reduction="none")
    assert torch.isnan(out[2]) and not torch.isnan(out[[0, 1, 3]]).any()


def test_bad_input_raises(device):
    h, w, b = _flce_inputs(6, 8, 50, torch.float32, True, device)
    y = torch.randint(0, 50, (6,), device=device)
    with pytest.raises(ValueError, match="hidden must have shape"):
        fused_linear_cross_entropy(h[:, :7], w, y)
    with pytest.raises(ValueError, match="one label per token"):
        fused_linear_cross_entropy(h, w, y[:5])
    with pytest.raises(ValueError, match="must have one dtype"):
        fused_linear_cross_entropy(h, w.to(torch.bfloat16), y)
    with pytest.raises(ValueError, match="bias must have shape"):
        fused_linear_cross_entropy(h, w, y, b[:10])
    with pytest.raises(ValueError, match="integer tensor"):
        fused_linear_cross_entropy(h, w, y.float())
    with pytest.raises(ValueError, match="weight must have shape"):
        fused_linear_cross_entropy(h, w[None], y)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="one label per token"):
        cross_entropy(h @ w.t(), y[:5])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_accumulation_equals_full_batch(dtype, device):
    """Two micro-batches with num_items_in_batch = all valid tokens give the full batch's loss and grads."""
    n, hdim, vocab = 30, 16, 500
    y = _labels(n, vocab, every=3).to(device)
    h, w, _ = _flce_inputs(n, hdim, vocab, dtype, False, device)
    # oracle: the full batch in fp64; baseline: PyTorch's same-dtype full batch
    ho, wo = h.double().requires_grad_(), w.double().requires_grad_()
    oracle = reference.linear_cross_entropy(ho, wo, y)
    oracle.backward()
    hb, wb = h.clone().requires_grad_(), w.clone().requires_grad_()
    base = _baseline_linear(y, {})(hb, wb)
    base.backward()
    n_items = int((y != -100).sum())
    ha, wa = h.clone().requires_grad_(), w.clone().requires_grad_()
    total = 0.0
    for sl in (slice(0, 13), slice(13, n)):
        part = fused_linear_cross_entropy(ha[sl], wa, y[sl], num_items_in_batch=torch.tensor(n_items))
        part.backward()
        total = total + part.detach()
    assert_close(total, oracle.detach(), base.detach(), dtype, "output", "accumulated loss")
    assert_close(ha.grad, ho.grad, hb.grad, dtype, "grad", "accumulated d_hidden")
    assert_close(wa.grad, wo.grad, wb.grad, dtype, "grad", "accumulated d_weight")


def test_frozen_weight_and_no_grad(device):
    """Only the requested gradients are computed; under no_grad nothing is."""
    h, w, _ = _flce_inputs(10, 8, 64, torch.float32, False, device)
    y = torch.randint(0, 64, (10,), device=device)
    h.requires_grad_(True)
    fused_linear_cross_entropy(h, w, y).backward()
    assert h.grad is not None and w.grad is None
    with torch.no_grad():
        out = fused_linear_cross_entropy(h, w, y)
    assert out.grad_fn is None
    assert_close(out, reference.linear_cross_entropy(h.double(), w.double(), y), None, torch.float32)


def test_retain_graph_double_backward_refused(device):
    h, w, _ = _flce_inputs(4, 8, 32, torch.float32, False, device)
    h.requires_grad_(True)
    loss = fused_linear_cross_entropy(h, w, torch.randint(0, 32, (4,), device=device))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()


def test_torch_compile_traces_custom_ops(device):
    """fullgraph compile (aot_eager: fake + autograd registrations, no Inductor build on the CPU)."""
    h, w, b = _flce_inputs(12, 8, 40, torch.float32, True, device)
    y = _labels(12, 40).to(device)
    fn = torch.compile(lambda h, w, b: fused_linear_cross_entropy(h, w, y, b, label_smoothing=0.1) +
                       cross_entropy(h @ w.t(), y, reduction="sum") * 0.5, backend="aot_eager", fullgraph=True)
    ref = lambda h, w, b: (reference.linear_cross_entropy(h, w, y, b, label_smoothing=0.1) +
                           reference.linear_cross_entropy(h, w, y, reduction="sum") * 0.5)
    check_op(fn, ref, [h, w, b], torch.float32, "compiled")


def test_opcheck_custom_ops(device):
    logits = torch.randn(5, 70, device=device, requires_grad=True)
    y = torch.randint(0, 70, (5,), device=device)
    torch.library.opcheck(torch.ops.hf_fastkern.ce_fwd, (logits, y, -100, 0.1, 1e-3, 0.0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    h = torch.randn(5, 8, device=device, requires_grad=True)
    w = torch.randn(70, 8, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.hf_fastkern.flce_fwd,
                          (h, w, None, y, torch.tensor(5.0), -100, 0.0, 0.0, 0.0, True, True, True, False, 4),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ----------------------------------------------------------------------------------------------------------
# eager autograd.Function path vs the custom ops (host cost, issues 6/7): same launchers, so bitwise equal


def _grads_of(fn, leaves, g):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in leaves]
    out = fn(*leaves)
    out.backward(g)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("reduce", [True, False], ids=["mean", "none"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_flce_function_matches_custom_op_bitwise(reduce, bias, device):
    h, w, b = _flce_inputs(37, 16, 111, torch.bfloat16, bias, device)
    y = _labels(37, 111).to(device)
    denom = (y != -100).sum().to(torch.float32) if reduce else torch.ones((), device=device)
    opts = (-100, 0.1, 1e-3, 0.0, reduce, True, True, bias, 16)
    g = torch.tensor(0.5, device=device) if reduce else torch.randn(37, device=device)
    o1, g1 = _grads_of(lambda h, w, b: FLCEFunction.apply(h, w, b, y, denom, *opts), (h, w, b), g)
    o2, g2 = _grads_of(lambda h, w, b: torch.ops.hf_fastkern.flce_fwd(h, w, b, y, denom, *opts)[0], (h, w, b), g)
    assert torch.equal(o1, o2)
    for a, c in zip(g1, g2):
        assert (a is None and c is None) or torch.equal(a, c)


def test_ce_function_matches_custom_op_bitwise(device):
    z = torch.randn(23, 70, device=device).to(torch.float16)
    y = _labels(23, 70).to(device)
    g = torch.randn(23, device=device)
    opts = (-100, 0.05, 1e-3, 15.0)
    o1, g1 = _grads_of(lambda z: CEFunction.apply(z, y, *opts), (z,), g)
    o2, g2 = _grads_of(lambda z: torch.ops.hf_fastkern.ce_fwd(z, y, *opts)[0], (z,), g)
    assert torch.equal(o1, o2) and torch.equal(g1[0], g2[0])


def test_eager_entries_use_the_function(device):
    """Eager calls build one Function node (no custom-op dispatch); compile keeps the custom ops (tested above)."""
    h, w, _ = _flce_inputs(9, 8, 40, torch.float32, False, device)
    h.requires_grad_(True)
    y = _labels(9, 40).to(device)
    loss = fused_linear_cross_entropy(h, w, y, reduction="sum")
    assert type(loss.grad_fn).__name__ == "FLCEFunctionBackward"
    rows = cross_entropy((h @ w.t()), y, reduction="none")
    assert type(rows.grad_fn).__name__ == "CEFunctionBackward"


def test_label_range_check_reads_the_host_once(device, monkeypatch):
    """The documented label check stays, as one fused reduction and exactly one device->host read per call
    (valid labels); the slow search for the bad position runs only when the check fails."""
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__index__", "__float__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    y = _labels(64, 50).to(device)
    check_label_range(y, 50, -100)
    assert len(reads) == 1, reads
    reads.clear()
    check_label_range(torch.full((4,), -100, device=device), 0, -100)  # every label ignored, empty vocab
    check_label_range(y[:0], 50, -100)
    assert len(reads) <= 2
    y[7] = 50
    with pytest.raises(ValueError, match=r"labels\[7\] = 50 is out of range"):
        check_label_range(y, 50, -100)
    y32 = _labels(16, 50).to(device=device, dtype=torch.int32)
    y32[3] = -7
    with pytest.raises(ValueError, match=r"labels\[3\] = -7 is out of range"):
        check_label_range(y32, 50, -100)


@pytest.mark.gpu
def test_label_range_check_one_sync_gpu():
    """On the device: the check of valid labels synchronises once (CUDA sync debug mode counts it)."""
    import warnings
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    y = torch.randint(0, 128256, (4, 2048), device="cuda")
    y[:, -1] = -100
    check_label_range(y, 128256, -100)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            check_label_range(y, 128256, -100)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [r for r in rec if "synchroniz" in str(r.message)]
    assert len(syncs) == 1, [str(r.message) for r in syncs]


@pytest.fixture
def async_labels(monkeypatch):
    monkeypatch.setenv("HF_FASTKERN_LABEL_CHECK", "async")
    resolve_label_checks()
    yield
    ce_mod._PENDING.clear()


def test_async_label_check_matches_sync_on_valid_labels(device, async_labels, monkeypatch):
    """HF_FASTKERN_LABEL_CHECK=async changes when a bad label is reported, nothing else: valid labels give the
    sync mode's loss and gradients bit for bit, and no check stays pending once settled."""
    h, w, _ = _flce_inputs(12, 8, 50, torch.float32, False, device)
    y = _labels(12, 50).to(device)
    y[3] = -100
    got = []
    for mode in ("async", "sync"):
        monkeypatch.setenv("HF_FASTKERN_LABEL_CHECK", mode)
        hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        loss = fused_linear_cross_entropy(hh, ww, y)
        loss.backward()
        got.append((loss.detach(), hh.grad, ww.grad))
    for a, b in zip(*got):
        assert torch.equal(a, b)
    resolve_label_checks()
    assert not ce_mod._PENDING


def test_async_label_check_bad_batch_is_nan_with_zero_grads_then_raises(device, async_labels):
    """A bad label found after the fact: that call's loss is NaN and its gradients exactly zero (no NaN reaches
    the weights), and the ValueError, naming value and position as the sync check does, comes from the
    backward when the values are in, else from the next call."""
    h, w, _ = _flce_inputs(6, 8, 50, torch.float32, False, device)
    y = torch.randint(0, 50, (2, 3), device=device)
    y[1, 2] = 50
    hh, ww = h.reshape(2, 3, 8).detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fused_linear_cross_entropy(hh, ww, y)
    assert torch.isnan(loss)
    msg = r"earlier call .*labels\[1, 2\] = 50 is out of range"
    with pytest.raises(ValueError, match=msg):
        loss.backward()
        # on a GPU the values may not be on the host yet at the backward: the next call raises
        assert torch.equal(hh.grad, torch.zeros_like(hh)) and torch.equal(ww.grad, torch.zeros_like(ww))
        fused_linear_cross_entropy(h, w, y.reshape(-1).clamp(max=49))
    assert not ce_mod._PENDING


def test_async_label_check_zero_grads_before_the_raise(device, async_labels):
    """The gradients a bad batch leaves (before its error is read) are zero, not NaN: shown with the error
    raised by the settling call after the backward."""
    h, w, _ = _flce_inputs(6, 8, 50, torch.float32, False, device)
    y = torch.randint(0, 50, (6,), device=device)
    y[4] = -5
    hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fused_linear_cross_entropy(hh, ww, y)
    ce_mod._PENDING[-1].event = _NeverReady()  # as if the copy were still in flight at the backward
    loss.backward()
    assert torch.isnan(loss)
    assert torch.equal(hh.grad, torch.zeros_like(hh)) and torch.equal(ww.grad, torch.zeros_like(ww))
    with pytest.raises(ValueError, match=r"labels\[4\] = -5 is out of range"):
        resolve_label_checks()


def test_async_label_check_zero_grads_whatever_reaches_the_loss(device, async_labels):
    """A NaN loss makes d f(loss) / d loss NaN for most f (here loss**2): the gradients stay exactly zero."""
    h, w, _ = _flce_inputs(6, 8, 50, torch.float32, False, device)
    y = torch.randint(0, 50, (6,), device=device)
    y[1] = 77
    hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fused_linear_cross_entropy(hh, ww, y)
    ce_mod._PENDING[-1].event = _NeverReady()
    (loss ** 2).backward()
    assert torch.equal(hh.grad, torch.zeros_like(hh)) and torch.equal(ww.grad, torch.zeros_like(ww))
    with pytest.raises(ValueError, match=r"labels\[1\] = 77"):
        resolve_label_checks()


def test_async_label_check_reports_every_bad_batch_and_a_changed_tensor(device, async_labels):
    """Each bad batch is reported once, also after an earlier error was caught; labels changed in place since
    their call are reported by value range (the position is gone)."""
    h, w, _ = _flce_inputs(4, 8, 50, torch.float32, False, device)
    first, second = _labels(4, 50).to(device), _labels(4, 50).to(device)
    first[0], second[2] = 60, -7
    for y in (first, second):
        fused_linear_cross_entropy(h, w, y)
        ce_mod._PENDING[-1].event = _NeverReady()
    with pytest.raises(ValueError, match=r"labels\[0\] = 60"):
        resolve_label_checks()
    second.fill_(1)  # changed in place before its check was read
    with pytest.raises(ValueError, match=r"a label in \[-7, .*position is unknown"):
        resolve_label_checks()
    assert not ce_mod._PENDING


def test_async_label_checks_settle_at_train_end(device, async_labels):
    """FastKernels (the Trainer callback) reads the last steps' pending checks when training ends."""
    from hf_fastkern import FastKernels
    h, w, _ = _flce_inputs(4, 8, 50, torch.float32, False, device)
    y = _labels(4, 50).to(device)
    y[3] = 51
    fused_linear_cross_entropy(h, w, y)
    ce_mod._PENDING[-1].event = _NeverReady()
    with pytest.raises(ValueError, match=r"labels\[3\] = 51"):
        FastKernels(verbose=False).on_train_end(None, None, None)
    FastKernels(verbose=False).on_train_end(None, None, None)  # nothing pending: nothing raised


class _NeverReady:
    """A stand-in event that has not completed until waited for."""

    def __init__(self):
        self.done = False

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True


def test_async_label_check_waits_only_for_checks_two_calls_old(device, async_labels):
    """The next call leaves the previous call's check pending (no wait) and waits only for older ones."""
    h, w, _ = _flce_inputs(6, 8, 50, torch.float32, False, device)
    y = _labels(6, 50).to(device)
    fused_linear_cross_entropy(h, w, y)
    first = ce_mod._PENDING[-1].event = _NeverReady()
    fused_linear_cross_entropy(h, w, y)
    assert len(ce_mod._PENDING) == 2 and not first.done
    fused_linear_cross_entropy(h, w, y)
    assert first.done and 1 <= len(ce_mod._PENDING) <= 2
    resolve_label_checks()
    assert not ce_mod._PENDING


def test_label_check_mode_rejects_unknown(device, monkeypatch):
    monkeypatch.setenv("HF_FASTKERN_LABEL_CHECK", "later")
    h, w, _ = _flce_inputs(4, 8, 50, torch.float32, False, device)
    with pytest.raises(ValueError, match="HF_FASTKERN_LABEL_CHECK must be one of sync, async"):
        fused_linear_cross_entropy(h, w, _labels(4, 50).to(device))


@pytest.mark.gpu
def test_async_label_check_no_sync_in_the_step_gpu(async_labels):
    """On the device: forward + backward of the fused loss with the asynchronous check make no synchronizing
    call (CUDA sync debug mode), and a bad label is still reported."""
    import warnings
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    h = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(32000, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 32000, (2048,), device="cuda")
    fused_linear_cross_entropy(h, w, y).backward()  # warm-up: compile, pinned-memory pool
    resolve_label_checks()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            fused_linear_cross_entropy(h, w, y).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(r.message) for r in rec if "synchroniz" in str(r.message)]
    assert not syncs, syncs
    y[5] = 32000
    with pytest.raises(ValueError, match=r"labels\[5\] = 32000 is out of range"):
        fused_linear_cross_entropy(h, w, y).backward()
        resolve_label_checks()


def test_default_chunk():
    assert default_chunk(8192, 128256, 2) == 512
    assert default_chunk(100, 128256, 2) == 100
    assert default_chunk(10**6, 32000, 4) == 1024


# ----------------------------------------------------------------------------------------------------------
# GPU, real sizes


def _chunked_oracle(h, w, y, chunk, dtype_logits):
    """Loss and gradients of mean CE, chunked so [tokens, vocab] never exists.

    dtype_logits=float32: the fp32 oracle (fp32 logits). dtype_logits=bf16: PyTorch's same-dtype baseline
    (bf16 logits from a bf16 matmul, loss in fp32), gradients rounded once to bf16 at the end.
    """
    n = h.shape[0]
    valid = (y != -100).sum().double()
    hf, wf = (h.float(), w.float()) if dtype_logits == torch.float32 else (h, w)
    dh = torch.empty(h.shape, device=h.device, dtype=torch.float32)
    dw = torch.zeros(w.shape, device=h.device, dtype=torch.float32)
    total = torch.zeros((), device=h.device, dtype=torch.float64)
    for s in range(0, n, chunk):
        z = (hf[s:s + chunk] @ wf.t()).float().requires_grad_()
        loss = F.cross_entropy(z, y[s:s + chunk], ignore_index=-100, reduction="sum")
        (g,) = torch.autograd.grad(loss, z)
        total += loss.double()
        g = (g / valid).to(hf.dtype)
        dh[s:s + chunk] = (g @ wf).float()
        dw += (g.t() @ hf[s:s + chunk]).float()
        del z, g
    out = (total / valid).float()
    if dtype_logits != torch.float32:
        return out, dh.to(h.dtype), dw.to(w.dtype)
    return out, dh, dw


@pytest.mark.gpu
@pytest.mark.parametrize("n_tok", [8192, 32768])
def test_fused_linear_cross_entropy_gpu_real_size(n_tok):
    """bf16 8192 / 32768 tokens x hidden 4096 x vocab 128256 (tokens x vocab > 2**31 for 32768)."""
    torch.cuda.empty_cache()
    hdim, vocab = 4096, 128256
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n_tok, hdim, device="cuda", dtype=torch.bfloat16, generator=g)
    w = (torch.randn(vocab, hdim, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02)
    y = torch.randint(0, vocab, (n_tok,), device="cuda", generator=g)
    y[::7] = -100
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_linear_cross_entropy(hk, wk, y)
    loss.backward()
    ref, dh_ref, dw_ref = _chunked_oracle(h, w, y, 2048, torch.float32)
    rel = abs(loss.item() - ref.item()) / abs(ref.item())
    assert rel <= 1e-4, f"loss {loss.item()} vs fp32 reference {ref.item()}: relative error {rel:.2e}"
    _, dh_base, dw_base = _chunked_oracle(h, w, y, 2048, torch.bfloat16)
    assert_close(hk.grad, dh_ref, dh_base, torch.bfloat16, "grad", "d_hidden")
    assert_close(wk.grad, dw_ref, dw_base, torch.bfloat16, "grad", "d_weight")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_linear_cross_entropy_gpu_options(dtype):
    n, hdim, vocab = 1025, 512, 32001
    y = _labels(n, vocab).cuda()
    for opts, bias in [({}, False), ({"reduction": "none", "label_smoothing": 0.1}, True),
                       ({"z_loss": 1e-4, "softcap": 30.0, "reduction": "sum"}, False)]:
        h, w, b = _flce_inputs(n, hdim, vocab, dtype, bias, "cuda")
        kern = lambda h, w, b=None, o=opts: fused_linear_cross_entropy(h, w, y, b, chunk_size=256, **o)
        ref = lambda h, w, b=None, o=opts: reference.linear_cross_entropy(h, w, y, b, **o)
        check_op(kern, ref, [h, w] + ([b] if bias else []), dtype, f"flce-gpu{opts}",
                 baseline_fn=_baseline_linear(y, opts))


@pytest.mark.gpu
def test_cross_entropy_gpu_large():
    n, vocab = 4096, 128256
    y = _labels(n, vocab).cuda()
    logits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16) * 3
    check_op(lambda z: cross_entropy(z, y, label_smoothing=0.05),
             lambda z: reference.cross_entropy(z, y, label_smoothing=0.05), [logits], torch.bfloat16, "ce-gpu")


@pytest.mark.gpu
def test_fused_linear_cross_entropy_gpu_compile():
    h, w, _ = _flce_inputs(512, 256, 5000, torch.bfloat16, False, "cuda")
    y = _labels(512, 5000).cuda()
    fn = torch.compile(lambda h, w: fused_linear_cross_entropy(h, w, y), fullgraph=True)
    check_op(fn, lambda h, w: reference.linear_cross_entropy(h, w, y), [h, w], torch.bfloat16, "flce-compiled",
             baseline_fn=_baseline_linear(y, {}))



def test_fused_linear_cross_entropy_backward_allocates_no_zero_grads():
    """Regression (H100 run 2026-11-25: 2.08 GiB peak instead of ~1.1): autograd materialised a zeros
    [vocab, hidden] 'gradient' for the internal d_weight output before the backward. Only the d_weight buffer
    itself may be weight-sized."""
    from torch.profiler import ProfilerActivity, profile

    V, H, T = 2048, 64, 32
    h = torch.randn(T, H, requires_grad=True)
    w = (torch.randn(V, H) * 0.02).requires_grad_()
    y = torch.randint(0, V, (T,))
    fused_linear_cross_entropy(h, w, y).backward()
    h.grad = w.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fused_linear_cross_entropy(h, w, y).backward()
    weight_sized = [e.name for e in prof.events()
                    if e.name in ("aten::zeros", "aten::empty_like") and e.cpu_memory_usage >= V * H * 4]
    assert weight_sized == ["aten::empty_like"], weight_sized


# --- edge cases ---


@pytest.mark.parametrize("red", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", ALL, ids=dtype_ids(ALL))
def test_cross_entropy_logits_pm_1e4(dtype, red, device):
    """Rows with logits of +-1e4: the label at +1e4 (loss ~0), at -1e4 (loss ~2e4), and mixed rows."""
    n, vocab = 6, 37
    logits = torch.randn(n, vocab, device=device)
    logits[0, 3] = 1e4
    logits[1, :] = -1e4
    logits[1, 5] = 1e4
    logits[2, ::2] = 1e4
    logits[3, 7] = -1e4
    labels = torch.tensor([3, 6, 4, 7, 0, 1], device=device)
    check_op(lambda z: cross_entropy(z, labels, reduction=red),
             lambda z: reference.cross_entropy(z, labels, reduction=red),
             [logits.to(dtype)], dtype, f"ce +-1e4 {red}")


@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1}, {"z_loss": 1e-4}],
                         ids=["plain", "label_smoothing", "z_loss"])
def test_cross_entropy_fp16_near_overflow(opts, device):
    """fp16 logits near the fp16 maximum (65504): exp, the row sum (label smoothing) and lse**2 (z-loss)
    all overflow fp16 unless computed in fp32, as the reference does."""
    n, vocab = 5, 50
    logits = (torch.rand(n, vocab, device=device) * 2 - 1) * 6.0e4
    logits[:, 0] = 65000.0
    labels = torch.tensor([0, 3, 49, 0, 17], device=device)
    check_op(lambda z: cross_entropy(z, labels, **opts),
             lambda z: reference.cross_entropy(z, labels, **opts),
             [logits.to(torch.float16)], torch.float16, f"ce fp16 near overflow {opts}")


def test_fused_linear_cross_entropy_fp16_large_logits(device):
    """hidden @ weight.T reaching ~3e4 in fp16 (still representable): loss and gradients as the reference."""
    tokens, hidden, vocab = 8, 16, 45
    h = torch.randn(tokens, hidden, device=device) * 8
    w = torch.randn(vocab, hidden, device=device) * 8
    scale = 3.0e4 / (h @ w.t()).abs().max()
    w = w * scale
    labels = torch.randint(0, vocab, (tokens,), device=device)
    check_op(lambda h, w: fused_linear_cross_entropy(h, w, labels),
             lambda h, w: reference.linear_cross_entropy(h, w, labels),
             [h.half(), w.half()], torch.float16, "flce fp16 large logits")


@pytest.mark.parametrize("dtype", ALL, ids=dtype_ids(ALL))
def test_cross_entropy_minus_inf_logits(dtype, device):
    """-inf logits (a vocabulary mask) away from the label: finite loss, zero gradient on masked entries."""
    n, vocab = 5, 33
    logits = torch.randn(n, vocab, device=device)
    logits[:, 20:] = float("-inf")
    logits[2, :19] = float("-inf")
    labels = torch.tensor([0, 5, 19, 12, -100], device=device)
    z = logits.to(dtype).requires_grad_(True)
    loss = cross_entropy(z, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert (z.grad[:, 20:] == 0).all()
    check_op(lambda z: cross_entropy(z, labels, reduction="none"),
             lambda z: reference.cross_entropy(z, labels, reduction="none"),
             [logits.to(dtype)], dtype, "ce -inf logits")


# --- huge sizes (GPU): past 2**31 elements ---


@pytest.mark.gpu
@pytest.mark.usefixtures("free_cuda_memory")
def test_cross_entropy_logits_over_2_31():
    vocab = HUGE_SIZES["vocab"]
    tokens = I32 // vocab + HUGE_SIZES["ce_extra"]  # 16807 x 128256 = 2.16e9 logits (4.3 GB bf16)
    assert tokens * vocab > I32
    logits = huge_randn(tokens, vocab, scale=2.0).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), device=HUGE_DEV)
    labels[-HUGE_SIZES["ce_extra"]:] = vocab - 1  # the very last elements of the tensor
    labels[::7] = -100
    loss = cross_entropy(logits, labels, reduction="none")
    dloss = torch.rand(tokens, device=HUGE_DEV)
    loss.backward(dloss)
    huge_sync()
    for s in huge_slices(tokens, I32 // vocab, HUGE_SIZES["ce_chunk"]):
        zo = logits.detach()[s].float().requires_grad_(True)
        zb = logits.detach()[s].clone().requires_grad_(True)
        lo = reference.cross_entropy(zo, labels[s], reduction="none")
        lb = reference.cross_entropy(zb, labels[s], reduction="none")
        lo.backward(dloss[s])
        lb.backward(dloss[s])
        name = f"cross_entropy rows {s.start}:{s.stop}"
        assert_close(loss.detach()[s], lo.detach(), lb.detach(), BF, "output", name)
        assert_close(logits.grad[s], zo.grad, zb.grad, BF, "grad", name + " dlogits")


@pytest.mark.gpu
@pytest.mark.usefixtures("free_cuda_memory")
def test_fused_linear_cross_entropy_tokens_times_vocab_over_2_31():
    tokens, hidden, vocab = HUGE_SIZES["flce"]  # 4.2e9 logits never materialised
    assert tokens * vocab > I32
    x = huge_randn(tokens, hidden).requires_grad_(True)
    w = huge_randn(vocab, hidden, scale=0.05).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), device=HUGE_DEV)
    labels[-8:] = vocab - 1 - torch.arange(8, device=HUGE_DEV)
    labels[::11] = -100
    loss = fused_linear_cross_entropy(x, w, labels, reduction="sum")
    loss.backward()
    huge_sync()
    chunk = HUGE_SIZES["flce_chunk"]
    dw_o = torch.zeros(vocab, hidden, device=HUGE_DEV)
    dw_b = torch.zeros(vocab, hidden, device=HUGE_DEV)
    total_o = torch.zeros((), device=HUGE_DEV, dtype=torch.float64)
    total_b = torch.zeros((), device=HUGE_DEV, dtype=torch.float64)
    wo = w.detach().float().requires_grad_(True)
    wb = w.detach().clone().requires_grad_(True)
    for i in range(0, tokens, chunk):
        s = slice(i, i + chunk)
        xo = x.detach()[s].float().requires_grad_(True)
        xb = x.detach()[s].clone().requires_grad_(True)
        lo = reference.linear_cross_entropy(xo, wo, labels[s], reduction="sum")
        lb = reference.linear_cross_entropy(xb, wb, labels[s], reduction="sum")
        lo.backward()
        lb.backward()
        total_o += lo.detach().double()
        total_b += lb.detach().double()
        dw_o += wo.grad
        dw_b += wb.grad.float()
        wo.grad = None
        wb.grad = None
        if i == 0 or i + chunk == tokens:
            assert_close(x.grad[s], xo.grad, xb.grad, BF, "grad", f"flce dhidden rows {i}:{i + chunk}")
    loss = loss.detach()
    rel = abs(float(loss) - float(total_o)) / abs(float(total_o))
    assert rel <= 1e-4, f"fused linear CE loss {float(loss):.6e} vs fp32 reference {float(total_o):.6e}: rel {rel:.2e}"
    assert_close(w.grad, dw_o, dw_b.to(BF), BF, "grad", "flce dweight over all tokens")


# --- bad input ---


@pytest.mark.parametrize("case", case_params(case_ids(ERROR_CASES, "flce/", "ce/", "cross_entropy/")))
def test_bad_input_raises_naming_argument(case, device):
    check_error_case(case, device)


@pytest.mark.parametrize("case", case_params(case_ids(VIEW_IDS, "flce/", "ce/", "cross_entropy/")))
def test_views_give_correct_results(case, device):
    check_view_case(case, device)


@pytest.mark.parametrize("case", case_ids(ZERO_IDS, "flce/", "ce/", "cross_entropy/"), ids=case_ids(ZERO_IDS, "flce/", "ce/", "cross_entropy/"))
def test_zero_length_batches(case, device):
    check_zero_length_case(case, device)


def test_out_of_range_label_message_says_value_and_position(device):
    """Not a device assert: the message gives the offending value (and where it is)."""
    labels = torch.tensor([0, 1, 2, 3, 4, 57, 6], device=device)
    msg = raises_naming(lambda: cross_entropy(r(7, 13, device=device), labels), "labels")
    assert "57" in msg, msg


@pytest.mark.parametrize("fn", ["cross_entropy", "fused_linear_cross_entropy"])
def test_mean_over_no_valid_token_is_nan_like_torch(fn, device):
    """Documented: 'mean' over zero valid tokens is 0/0 = NaN, exactly torch.nn.functional.cross_entropy."""
    labels = torch.full((4,), -100, device=device)
    torch_val = torch.nn.functional.cross_entropy(torch.randn(4, 11), labels.cpu())
    if fn == "cross_entropy":
        out = cross_entropy(r(4, 11, device=device), labels)
    else:
        out = fused_linear_cross_entropy(r(4, H, device=device), r(11, H, device=device), labels)
    assert torch.isnan(torch_val) and torch.isnan(out)


@pytest.mark.parametrize("fn", ["cross_entropy", "fused_linear_cross_entropy"])
def test_unchecked_out_of_range_label_is_nan_not_a_read_out_of_bounds(fn, device, monkeypatch):
    """With the documented opt-out HF_FASTKERN_SKIP_LABEL_CHECK=1 (no host sync), an out-of-range label reads
    nothing and makes the loss NaN: loud, never a silently plausible value or a device assert."""
    monkeypatch.setenv("HF_FASTKERN_SKIP_LABEL_CHECK", "1")
    labels = torch.tensor([0, 1, 1000, 3], device=device)
    if fn == "cross_entropy":
        out = cross_entropy(r(4, 11, device=device), labels)
    else:
        out = fused_linear_cross_entropy(r(4, H, device=device), r(11, H, device=device), labels)
    assert torch.isnan(out), f"{fn} with an unchecked out-of-range label gave {float(out)}"


# --- determinism ---


@pytest.mark.parametrize("case", ["cross_entropy", "fused_linear_cross_entropy"], ids=["cross_entropy", "fused_linear_cross_entropy"])
def test_bitwise_identical_gradients(case, device):
    check_bitwise_case(case, device, big=False, runs=2)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["cross_entropy", "fused_linear_cross_entropy"], ids=["cross_entropy", "fused_linear_cross_entropy"])
def test_bitwise_identical_gradients_gpu_real_size(case):
    """Many programs in flight (where atomics would reorder sums): three runs, bit-identical."""
    check_bitwise_case(case, "cuda", big=True, runs=3)
    torch.cuda.empty_cache()
