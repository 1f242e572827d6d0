"""DirectLaunch (hf_fastkern/kernels/_triton_utils.py): a compiled kernel replayed without Triton's per-call
binding. On the CPU: its key is at least as fine as Triton's own specialization (so one key never stands for two
compiled kernels), and a fake JITFunction shows what it replays, with which arguments, and when it falls back to
``JITFunction.run``. On the device (``gpu``): replayed launches give bitwise the output of Triton's own launch,
alignment and divisibility changes select another compiled kernel, and the second launch of a shape skips
``JITFunction.run``."""
import itertools

import pytest
import torch
import triton.language as tl

from hf_fastkern.kernels import _triton_utils as tu


def _triton_spec(arg):
    """Triton's own specialization of one argument (specialize=True, align=True: a plain parameter)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return native_specialize_impl(BaseBackend, arg, False, True, True)


def _our_key(arg):
    """DirectLaunch's key of a one-argument call site."""
    return tu.DirectLaunch(JITFunction(lambda x: None))._keyfn((type(arg),))(arg)


def _samples():
    ints = [0, 1, 2, 3, 8, 15, 16, 17, 32, 48, -1, -16, -17, 2 ** 31 - 16, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 16,
            -(2 ** 31), -(2 ** 31) - 1, -(2 ** 31) - 16, 2 ** 40, 2 ** 40 + 3, 2 ** 63 - 16, 2 ** 63, 2 ** 63 + 16,
            2 ** 64 - 16]
    base = torch.zeros(64, dtype=torch.float32)
    tensors = [base, base[1:], base[4:], torch.zeros(8, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.bfloat16)[3:],
               torch.zeros(8, dtype=torch.float16), torch.zeros(8, dtype=torch.int64)[1:],
               torch.zeros(8, dtype=torch.uint8)[1:], torch.zeros(8, dtype=torch.bool)]
    return ints + [0.0, 1.0, -2.5, True, False, None] + tensors


def test_key_is_at_least_as_fine_as_triton_specialization():
    """Two arguments with one key always get one Triton specialization (the converse need not hold: a finer key
    only costs a second lookup through Triton, which finds the same compiled kernel)."""
    samples = _samples()
    keys = [(type(a), _our_key(a)) for a in samples]
    specs = [_triton_spec(a) for a in samples]
    checked = 0
    for (ka, sa), (kb, sb) in itertools.combinations(zip(keys, specs), 2):
        if ka == kb:
            checked += 1
            assert sa == sb, (ka, sa, sb)
    assert checked > 0  # some pairs share a key (e.g. 16 and 48), so the check compares something
    # and the distinctions Triton makes are all visible in the key
    assert _our_key(16) != _our_key(17) and _our_key(1) != _our_key(17)
    assert _our_key(2 ** 31 - 16) != _our_key(2 ** 31) and _our_key(2 ** 40) != _our_key(2 ** 63)
    base = torch.zeros(8)
    assert _our_key(base) != _our_key(base[1:])


class JITFunction:
    """A stand-in with the attributes DirectLaunch reads from triton.runtime.jit.JITFunction."""

    def __init__(self, fn):
        self.fn = fn
        self.pre_run_hooks = []
        self.slow = []
        self.fast = []

    def run(self, *args, grid, warmup, **kw):
        self.slow.append((grid, args, kw))
        owner = self

        class Compiled:
            function = "fn-handle"
            packed_metadata = ("meta", len(owner.slow))

            @staticmethod
            def run(*a):
                owner.fast.append(a)

        return Compiled()


def _kernel(X, Y, n, scale, STRIDE, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):  # signature only
    pass


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(tu, "DIRECT_LAUNCH", True)
    monkeypatch.setenv("HF_FASTKERN_DIRECT_LAUNCH", "1")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(tu, "_current_stream", lambda device: 7)
    jit = JITFunction(_kernel)
    return jit, tu.DirectLaunch(jit)


def test_replays_with_triton_call_form(fake):
    jit, launch = fake
    x, y = torch.zeros(32), torch.zeros(32)
    launch((4, 2), x, y, 32, 0.5, 16, BLOCK=64, num_warps=4)
    assert len(jit.slow) == 1 and not jit.fast  # the first launch of a key goes through Triton
    launch((5,), x, y, 64, 0.25, 48, BLOCK=64, num_warps=4)  # same classes: 64 and 48 are multiples of 16
    assert len(jit.slow) == 1 and len(jit.fast) == 1
    # Triton's form: grid padded to 3-D, stream, function, metadata, no launch metadata or hooks, then every
    # parameter in signature order, constexprs included (FLAG from its default), launch options left out
    assert jit.fast[0] == (5, 1, 1, 7, "fn-handle", ("meta", 1), None, None, None, x, y, 64, 0.25, 48, 64, False)


@pytest.mark.parametrize("change", ["int_one", "int_residue", "int_range", "misaligned", "dtype", "constexpr",
                                    "constexpr_type", "option", "type"])
def test_new_specialization_goes_through_triton(fake, change):
    jit, launch = fake
    x, y = torch.zeros(64), torch.zeros(64)
    args = [x, y, 32, 0.5, 16]
    kw = dict(BLOCK=64, num_warps=4)
    launch((1,), *args, **kw)
    launch((1,), *args, **kw)
    assert (len(jit.slow), len(jit.fast)) == (1, 1)
    if change == "int_one":
        args[4] = 1
    elif change == "int_residue":
        args[4] = 17
    elif change == "int_range":
        args[2] = 2 ** 31
    elif change == "misaligned":
        args[0] = x[1:]
    elif change == "dtype":
        args[1] = y.bfloat16()
    elif change == "constexpr":
        kw["BLOCK"] = 128
    elif change == "constexpr_type":  # 64.0 == 64 and hashes alike; Triton compiles a float constexpr apart
        kw["BLOCK"] = 64.0
    elif change == "option":
        kw["num_warps"] = 8
    else:
        args[1] = None
    launch((1,), *args, **kw)
    assert (len(jit.slow), len(jit.fast)) == (2, 1)
    launch((1,), *args, **kw)
    assert (len(jit.slow), len(jit.fast)) == (2, 2)


def test_falls_back_when_it_cannot_replay(fake, monkeypatch):
    jit, launch = fake
    x = torch.zeros(16)
    launch((1,), x, x, 16, 1.0, 16, BLOCK=16)
    launch(lambda meta: (1,), x, x, 16, 1.0, 16, BLOCK=16)  # a grid function needs Triton's bound arguments
    assert (len(jit.slow), len(jit.fast)) == (2, 0)
    launch((1,), x, x, 16, 1.0, 16, BLOCK=16)
    assert len(jit.fast) == 1
    monkeypatch.setattr(tu.triton.knobs.runtime, "launch_enter_hook", lambda meta: None)  # a profiler
    launch((1,), x, x, 16, 1.0, 16, BLOCK=16)
    assert (len(jit.slow), len(jit.fast)) == (3, 1)
    monkeypatch.undo()
    monkeypatch.setattr(tu, "DIRECT_LAUNCH", True)
    monkeypatch.setenv("HF_FASTKERN_DIRECT_LAUNCH", "1")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(tu, "_current_stream", lambda device: 7)
    jit.pre_run_hooks.append(lambda *a, **k: None)
    launch((1,), x, x, 16, 1.0, 16, BLOCK=16)
    assert (len(jit.slow), len(jit.fast)) == (4, 1)
    jit.pre_run_hooks.clear()
    launch((1,), x, x, 16, 1.0, 16, BLOCK=16, FLAG=[1])  # an unhashable constexpr: no key
    assert (len(jit.slow), len(jit.fast)) == (5, 1)


@pytest.mark.parametrize("how", ["runtime_by_keyword", "constexpr_positional"])
def test_calls_outside_the_convention_never_replay(fake, how):
    """A runtime argument by keyword would be replayed from the first call, a positional constexpr keyed by its
    class only: such call sites keep Triton's launch on every call."""
    jit, launch = fake
    x = torch.zeros(16)
    for _ in range(3):
        if how == "runtime_by_keyword":
            launch((1,), x, x, 16, 1.0, STRIDE=16, BLOCK=16)
        else:
            launch((1,), x, x, 16, 1.0, 16, 16)
    assert (len(jit.slow), len(jit.fast)) == (3, 0)


def test_switch_turns_replay_on_and_off_at_run_time(fake, monkeypatch):
    """Opt-in until measured on a GPU: unset or anything but 1 launches through Triton."""
    jit, launch = fake
    x = torch.zeros(16)
    launch((1,), x, x, 16, 1.0, 16, BLOCK=16)
    for value in ("0", ""):
        monkeypatch.setenv("HF_FASTKERN_DIRECT_LAUNCH", value)
        launch((1,), x, x, 16, 1.0, 16, BLOCK=16)
    monkeypatch.delenv("HF_FASTKERN_DIRECT_LAUNCH")
    launch((1,), x, x, 16, 1.0, 16, BLOCK=16)
    assert (len(jit.slow), len(jit.fast)) == (4, 0)
    monkeypatch.setenv("HF_FASTKERN_DIRECT_LAUNCH", "1")
    launch((1,), x, x, 16, 1.0, 16, BLOCK=16)
    assert (len(jit.slow), len(jit.fast)) == (4, 1)


def test_other_devices_have_their_own_kernels(fake, monkeypatch):
    jit, launch = fake
    x = torch.zeros(16)
    launch((1,), x, x, 16, 1.0, 16, BLOCK=16)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    launch((1,), x, x, 16, 1.0, 16, BLOCK=16)
    assert (len(jit.slow), len(jit.fast)) == (2, 0)


def test_interpreter_and_other_tritons_keep_triton_launch(monkeypatch):
    monkeypatch.setattr(tu, "DIRECT_LAUNCH", False)
    jit = JITFunction(_kernel)
    launch = tu.DirectLaunch(jit)
    x = torch.zeros(16)
    for _ in range(2):
        launch((1,), x, x, 16, 1.0, 16, BLOCK=16)
    assert (len(jit.slow), len(jit.fast)) == (2, 0)
    if tu.INTERPRET:
        assert not tu.DIRECT_LAUNCH and not tu._direct_launch_available()


# ----------------------------------------------------------------------------------------------------------
# device


@pytest.mark.gpu
def test_gpu_replay_is_bitwise_triton_launch(monkeypatch):
    """The decoding kernels (35 and 17 arguments), RoPE and a tuned norm: the replayed launch gives bitwise what
    Triton's own launch gives, a misaligned cache view gets its own compiled kernel and stays exact, and a warm
    shape never enters JITFunction.run."""
    from hf_fastkern.kernels import decode_attention as dec
    from hf_fastkern.kernels import rms_norm as rn
    from hf_fastkern.kernels import rope as rope_mod

    assert tu.DIRECT_LAUNCH, "this Triton's JITFunction.run has another launch form: DirectLaunch is off"
    monkeypatch.setenv("HF_FASTKERN_DIRECT_LAUNCH", "1")
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(2, 32, 1, 128, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(2, 8, 4097, 2, 128, device=dev, dtype=torch.bfloat16)
    k, v = kv[:, :, :4096, 0], kv[:, :, :4096, 1]
    mask = torch.ones(2, 4096, dtype=torch.bool, device=dev)
    mask[0, :5] = False

    def decode(kk, vv):
        return dec.flash_decode_heads_first(q, kk, vv, key_mask=mask)

    def slow_only(fn, *args):
        with tu.triton_launches():
            return fn(*args)

    want = slow_only(decode, k, v)
    decode(k, v)  # first direct-path launch of this key: through Triton
    slow = []
    real_split, real_combine = dec._SPLIT.jit.run, dec._COMBINE.jit.run
    monkeypatch.setattr(dec._SPLIT.jit, "run", lambda *a, **kw: slow.append(1) or real_split(*a, **kw))
    monkeypatch.setattr(dec._COMBINE.jit, "run", lambda *a, **kw: slow.append(1) or real_combine(*a, **kw))
    got = decode(k, v)
    assert not slow, "a warm shape entered JITFunction.run"
    assert torch.equal(got, want)
    # the same cache one element off 16-byte alignment: another specialization, compiled through Triton once
    kv2 = torch.randn(2 * 8 * 4097 * 2 * 128 + 1, device=dev, dtype=torch.bfloat16)[1:].view(2, 8, 4097, 2, 128)
    k2, v2 = kv2[:, :, :4096, 0], kv2[:, :, :4096, 1]
    assert k2.data_ptr() % 16
    got2 = decode(k2, v2)
    assert len(slow) == 1  # the split kernel's key changed; the combine kernel's arguments did not
    n = len(slow)
    want2 = slow_only(decode, k2, v2)  # (Triton's launch path, through the counted run)
    assert torch.equal(got2, want2)
    assert torch.equal(decode(k2, v2), got2) and len(slow) == n + 2  # replayed: only slow_only's two launches

    x = torch.randn(3, 7, 4096, device=dev, dtype=torch.bfloat16)
    w = torch.randn(4096, device=dev, dtype=torch.bfloat16)
    norm = lambda: rn._rms_norm_fwd_impl(x, w, 1e-6, 0.0, True, False)[0]  # noqa: E731
    ref = slow_only(norm)
    for _ in range(3):
        assert torch.equal(norm(), ref)
    qq = torch.randn(2, 32, 5, 128, device=dev, dtype=torch.bfloat16)
    kk = torch.randn(2, 8, 5, 128, device=dev, dtype=torch.bfloat16)
    cos = torch.randn(2, 5, 128, device=dev, dtype=torch.bfloat16)
    sin = torch.randn_like(cos)
    rope = lambda: rope_mod._rope_pair(qq, kk, cos, sin, False, torch.bfloat16)  # noqa: E731
    ref_q, ref_k = slow_only(rope)
    for _ in range(3):
        gq, gk = rope()
        assert torch.equal(gq, ref_q) and torch.equal(gk, ref_k)
