"""attn_implementation="fastkern" inside transformers models: registration, mask handling, fallbacks, errors.

Tiny random-init models (no downloads). bf16 runs the Triton kernel (interpreter on the CPU); fp32 falls back
to SDPA. Model-level comparisons use the one tolerance rule (tests/tolerances.py): fastkern in dtype vs the
fp64 "sdpa" model (oracle), bounded by 2x/3x the error of "sdpa" in the same dtype.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DataCollatorWithFlattening,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

import hf_fastkern  # noqa: F401  (registers "fastkern")
from hf_fastkern.kernels import dispatch, reference, routing
from hf_fastkern.patches import attention as fk
from tests.harness import LOW, dtype_ids
from tests.tolerances import assert_close

VOCAB = 96
# initializer_range 0.2 makes random-init logits peaked, so greedy decoding is not a coin toss between ties.
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=4096, initializer_range=0.2)


def make_config(arch: str, head_dim: int = 16, heads: int = 4, kv_heads: int = 2, layers: int = 2):
    hidden = head_dim * heads
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=COMMON["max_position_embeddings"],
                          vocab_size=VOCAB, initializer_range=0.2, bos_token_id=0, eos_token_id=0,
                          attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    kw = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, bos_token_id=0, eos_token_id=0,
              pad_token_id=0, **COMMON)
    if arch == "llama":
        return LlamaConfig(**kw)
    if arch == "mistral":
        return MistralConfig(sliding_window=7, **kw)  # smaller than every sequence below
    if arch == "qwen2":
        return Qwen2Config(use_sliding_window=False, **kw)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "gpt2"]


def model_pair(arch: str, **cfg_kw):
    """(sdpa model, fastkern model) with the same weights, eval mode, fp32."""
    torch.manual_seed(0)
    cfg = make_config(arch, **cfg_kw)
    ref, fast = pair_from_config(cfg)
    assert fast.config._attn_implementation == "fastkern"
    return ref, fast


class KernelCalls:
    """Counts the kernel entry points the attention function reaches (proves the kernel path really ran)."""

    def __init__(self, monkeypatch):
        self.dense = 0
        self.varlen = 0
        dense, varlen = fk._kernels.flash_attention, fk._kernels.flash_attention_varlen
        # the dense path of the attention function enters through the heads-first entry (checks done by then)
        heads_first = fk._kernels.flash_attention_heads_first

        def d(*a, **k):
            self.dense += 1
            return dense(*a, **k)

        def hf(*a, **k):
            self.dense += 1
            return heads_first(*a, **k)

        def v(*a, **k):
            self.varlen += 1
            return varlen(*a, **k)

        monkeypatch.setattr(fk._kernels, "flash_attention", d)
        monkeypatch.setattr(fk._kernels, "flash_attention_heads_first", hf)
        monkeypatch.setattr(fk._kernels, "flash_attention_varlen", v)


def run(model, dtype, ids, grads=True, **kw):
    """Forward (+ backward of the loss): returns logits, loss and {param name: grad} (fp32 copies detached)."""
    m = copy.deepcopy(model).to(dtype)
    m.zero_grad(set_to_none=True)
    labels = kw.pop("labels", ids)
    out = m(input_ids=ids, labels=labels, **kw)
    g = {}
    if grads:
        out.loss.backward()
        g = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    # a model patched by apply_fast_kernels returns no logits from a training forward with labels (fused loss)
    return None if out.logits is None else out.logits.detach(), out.loss.detach(), g


def pair_from_config(cfg, device: str = "cpu"):
    """(sdpa model, fastkern model) of ``cfg`` in eval mode on ``device``, with the same weights."""
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").to(device).eval()
    fast = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="fastkern").to(device).eval()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def compare(fast, ref, dtype, ids, select=None, grads=True, ref_kw=None, **kw):
    """fastkern in dtype vs fp64 sdpa (oracle), bounded by sdpa in dtype (baseline); ``ref_kw``: sdpa's own
    keyword arguments where they must differ (default: the same)."""
    ref_kw = dict(kw) if ref_kw is None else ref_kw
    lo_f, l_f, g_f = run(fast, dtype, ids, grads, **kw)
    lo_o, l_o, g_o = run(ref, torch.float64, ids, grads, **ref_kw)
    lo_b, l_b, g_b = run(ref, dtype, ids, grads, **ref_kw)
    sel = (lambda t: t[select]) if select is not None else (lambda t: t)
    if lo_f is not None or not fast.training:
        assert_close(sel(lo_f), sel(lo_o), sel(lo_b), dtype, "output", "logits")
    assert_close(l_f, l_o, l_b, dtype, "output", "loss")
    for n in g_o:
        assert n in g_f, f"no gradient reached {n}"
        assert_close(g_f[n], g_o[n], g_b[n], dtype, "grad", f"grad {n}")


@pytest.fixture(autouse=True)
def _fresh_warnings():
    dispatch.reset_warnings()
    fk._cache.clear()
    yield


# ----------------------------------------------------------------------------------------------------------
# registration


def test_registered_in_both_interfaces():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    fk.register_fastkern_attention()  # idempotent
    fk.register_fastkern_attention()
    assert AttentionInterface._global_mapping["fastkern"] is fk.fastkern_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["fastkern"] is fk.fastkern_mask


def test_from_pretrained_and_set_attn_implementation(tmp_path):
    cfg = make_config("llama")
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fastkern")
    assert loaded.config._attn_implementation == "fastkern"
    model.set_attn_implementation("fastkern")
    assert model.config._attn_implementation == "fastkern"
    ids = torch.randint(1, VOCAB, (1, 9))
    torch.testing.assert_close(model(ids).logits, loaded(ids).logits, rtol=0, atol=0)
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------------------------------------
# models: logits, loss, gradients vs sdpa


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16-kernel", "fp32-fallback"])
@pytest.mark.parametrize("arch", ARCHS)
def test_model_matches_sdpa(arch, dtype, monkeypatch):
    ref, fast = model_pair(arch)
    calls = KernelCalls(monkeypatch)
    ids = torch.randint(1, VOCAB, (2, 13))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        compare(fast, ref, dtype, ids)
    fallbacks = [x for x in w if issubclass(x.category, dispatch.FastKernFallbackWarning)]
    if dtype == torch.bfloat16:
        assert calls.dense > 0 and not fallbacks
    else:
        assert calls.dense == 0 and len(fallbacks) == 1 and "SDPA" in str(fallbacks[0].message)


@pytest.mark.parametrize("arch,side", [("llama", "right"), ("llama", "left"), ("mistral", "left"),
                                       ("gpt2", "right")])
def test_padding_mask(arch, side, monkeypatch):
    ref, fast = model_pair(arch)
    calls = KernelCalls(monkeypatch)
    ids = torch.randint(1, VOCAB, (3, 14))
    am = torch.ones(3, 14, dtype=torch.long)
    if side == "right":
        am[0, 9:] = 0
        am[2, 12:] = 0
    else:
        am[0, :5] = 0
        am[2, :2] = 0
    labels = ids.masked_fill(am == 0, -100)
    compare(fast, ref, torch.bfloat16, ids, select=am.bool(), attention_mask=am, labels=labels)
    assert calls.varlen > 0 and calls.dense == 0


def test_padding_mask_fp32_fallback():
    ref, fast = model_pair("mistral")
    ids = torch.randint(1, VOCAB, (2, 12))
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :4] = 0
    labels = ids.masked_fill(am == 0, -100)
    compare(fast, ref, torch.float32, ids, select=am.bool(), attention_mask=am, labels=labels)


def _packed_batch(lengths, flash_kwargs=False):
    feats = [{"input_ids": torch.randint(1, VOCAB, (n,)).tolist()} for n in lengths]
    coll = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs, return_tensors="pt")
    return feats, coll(feats)


@pytest.mark.parametrize("route", ["mask", "position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_packed_sequences_match_separate(arch, route, monkeypatch):
    """Packed like DataCollatorWithFlattening vs each sequence run on its own (no cross-sequence attention).
    Routes: the mask side sees the packing (use_cache=False); only position_ids reach the attention (forward()
    made an empty cache, so transformers' mask code does not look for packing); flash kwargs alone."""
    ref, fast = model_pair(arch)
    calls = KernelCalls(monkeypatch)
    feats, batch = _packed_batch([5, 9, 4], route == "cu_seq_lens")
    kw = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
    if route == "cu_seq_lens":
        kw.pop("position_ids")  # the flash kwargs alone must be enough
    if route == "mask":
        kw["use_cache"] = False
    fm = copy.deepcopy(fast).to(torch.bfloat16)
    _assert_matches_separate(fm(input_ids=batch["input_ids"], **kw).logits[0], feats, ref)
    assert calls.varlen > 0 and calls.dense == 0


def _assert_matches_separate(packed, feats, ref):
    """packed [total, vocab] logits of a packed row vs each sequence run on its own by ``ref`` (fp64 oracle,
    bf16 baseline)."""
    start = 0
    for f in feats:
        ids = torch.tensor([f["input_ids"]])
        n = ids.shape[1]
        oracle = copy.deepcopy(ref).double()(ids).logits[0]
        base = copy.deepcopy(ref).to(torch.bfloat16)(ids).logits[0]
        assert_close(packed[start:start + n].float(), oracle, base, torch.bfloat16, "output", f"packed seq at {start}")
        start += n


def _patched_counting_looks(monkeypatch):
    """(sdpa model, the same model patched by apply_fast_kernels, list that grows by one per look of the attention
    function for packed sequences in position_ids)."""
    from hf_fastkern import apply_fast_kernels

    ref, fast = model_pair("llama")
    apply_fast_kernels(fast)
    looks = []
    real = fk._segments_from_positions
    monkeypatch.setattr(fk, "_segments_from_positions", lambda pos: looks.append(1) or real(pos))
    return ref, fast, looks


def test_packed_sequences_gradients():
    """Loss and gradients of a packed batch (position_ids restart) equal sdpa's packed path."""
    ref, fast = model_pair("llama")
    _, batch = _packed_batch([5, 3, 4])
    # use_cache=False: with an (empty) cache transformers' sdpa masks do not look for packing at all
    compare(fast, ref, torch.bfloat16, batch["input_ids"], labels=batch["labels"],
            position_ids=batch["position_ids"], use_cache=False)


def test_packed_training_forward_detects_once(monkeypatch):
    """A patched training forward builds no cache (patches/training_cache.py), so transformers' mask builder looks
    for packing in position_ids itself; the attention function does not look again (its look reads the device
    three times per forward: issue 21's host-bound B1 steps). Packed and plain batches stay exact, and a forward
    with a cache (transformers does not look there) still finds the packing itself."""
    ref, fast, looks = _patched_counting_looks(monkeypatch)
    _, batch = _packed_batch([5, 3, 4])
    ids, pos = batch["input_ids"], batch["position_ids"]
    ref.train()
    fast.train()
    # no use_cache: the guard turns it off; unpatched sdpa needs use_cache=False to see the packing at all
    compare(fast, ref, torch.bfloat16, ids, labels=batch["labels"], position_ids=pos,
            ref_kw=dict(labels=batch["labels"], position_ids=pos, use_cache=False))
    compare(fast, ref, torch.bfloat16, ids, position_ids=torch.arange(ids.shape[1])[None])  # one sequence
    assert looks == []
    fast.eval()
    with torch.no_grad():
        fast.to(torch.bfloat16)(input_ids=ids, position_ids=pos, use_cache=True)
    assert looks == [1]


def test_masks_see_position_ids_from_source():
    """The guard trusts transformers' packing look only in decoders whose mask builders get position_ids."""
    from transformers import BioGptModel, GemmaModel, GPT2Model, LlamaModel, MistralModel, Qwen3Model

    from hf_fastkern.patches.training_cache import _masks_see_position_ids

    # GPT-2's cross-attention mask builder (encoder_hidden_states) takes no position_ids and does not count
    assert all(_masks_see_position_ids(c) for c in (LlamaModel, MistralModel, Qwen3Model, GemmaModel, GPT2Model))
    assert not _masks_see_position_ids(BioGptModel)  # builds its mask without position_ids


@pytest.mark.parametrize("bad", ["dropout", "key_batch", "mask_shape"])
def test_decode_early_path_declines(bad, monkeypatch):
    """A cached call with dropout, or with shapes the kernel path's checks reject, does not take the early stock
    path: dropout reaches the path that applies it, and bad input raises ValueError as on every other path."""
    monkeypatch.setenv(routing.MODE_ENV, "stock")
    monkeypatch.setenv(fk.ATTENTION_BACKEND_ENV, "auto")
    monkeypatch.setattr(fk, "_decode_to_stock", lambda *a, **k: pytest.fail("early path taken"))
    mod = torch.nn.Module()
    mod.is_causal = True
    q = torch.randn(2, 4, 1, 16, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 8, 16, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    if bad == "dropout":
        out, _ = fk.fastkern_attention_forward(mod, q, k, v, None, dropout=0.5)
        assert out.shape == (2, 1, 4, 16)
    elif bad == "key_batch":
        with pytest.raises(ValueError):
            fk.fastkern_attention_forward(mod, q, k[:1], v[:1], None)
    else:
        with pytest.raises(ValueError):
            fk.fastkern_attention_forward(mod, q, k, v, torch.ones(1, 8, dtype=torch.bool))


def test_packed_training_forward_with_mask_still_looks(monkeypatch):
    """With an attention mask (all ones) transformers does not look for packing, so in a training forward the
    attention function still does: packed sequences keep to themselves."""
    ref, fast, looks = _patched_counting_looks(monkeypatch)
    feats, batch = _packed_batch([5, 9, 4])
    fm = copy.deepcopy(fast).to(torch.bfloat16).train()
    ids = batch["input_ids"]
    packed = fm(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=batch["position_ids"]).logits[0]
    assert looks == [1]
    _assert_matches_separate(packed, feats, ref)


# ----------------------------------------------------------------------------------------------------------
# generate


@pytest.mark.parametrize("arch,dtype", [(a, torch.float32) for a in ARCHS]
                         + [("llama", torch.bfloat16), ("mistral", torch.bfloat16)],
                         ids=[f"{a}-fp32-fallback" for a in ARCHS] + ["llama-bf16-kernel", "mistral-bf16-kernel"])
def test_generate_greedy_matches_sdpa(arch, dtype):
    ref, fast = model_pair(arch)
    ref, fast = ref.to(dtype), fast.to(dtype)
    ids = torch.randint(1, VOCAB, (2, 7))
    am = torch.ones_like(ids)
    am[1, :3] = 0  # left padding, as generate() expects
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    a = ref.generate(ids, attention_mask=am, **kw)
    b = fast.generate(ids, attention_mask=am, **kw)
    assert a.shape[1] == 15
    assert torch.equal(a, b), f"{arch} {dtype}: sdpa {a[:, 7:].tolist()} vs fastkern {b[:, 7:].tolist()}"


def test_generate_decode_routed_to_stock_skips_own_checks(monkeypatch):
    """KV-cache steps the routing table sends to stock (one-token steps on an H100) run SDPA as unpatched, decided
    before any validation of our own: a step's signature changes with the cache length, so a per-signature check
    would run again in every step. Greedy tokens equal sdpa's, with left padding (the 2-D mask path)."""
    ref, fast = model_pair("llama")
    ref, fast = ref.to(torch.bfloat16), fast.to(torch.bfloat16)
    ids = torch.randint(1, VOCAB, (2, 7))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    a = ref.generate(ids, attention_mask=am, **kw)
    monkeypatch.setenv(routing.MODE_ENV, "stock")
    monkeypatch.setenv(fk.ATTENTION_BACKEND_ENV, "auto")  # conftest pins "triton", which never routes
    checks, stock_steps = [], []
    real_validate, real_decode = fk._validate, fk._decode_to_stock

    def decode_to_stock(*args, **kwargs):
        res = real_decode(*args, **kwargs)
        stock_steps.append(res is not None)
        return res

    monkeypatch.setattr(fk, "_validate", lambda *a, **k: checks.append(a[0].shape) or real_validate(*a, **k))
    monkeypatch.setattr(fk, "_decode_to_stock", decode_to_stock)
    fk._CHECKED.clear()
    b = fast.generate(ids, attention_mask=am, **kw)
    assert torch.equal(a, b), f"sdpa {a[:, 7:].tolist()} vs fastkern {b[:, 7:].tolist()}"
    layers = fast.config.num_hidden_layers
    assert stock_steps == [True] * 7 * layers  # every cached step of every layer took the early stock path
    assert checks and all(s[2] == 7 for s in checks), checks  # only the prefill (q_len 7) was validated


def test_generate_static_cache_falls_back():
    """Static caches hand over keys past the written positions: the mask side falls back to SDPA's dense mask."""
    ref, fast = model_pair("llama")
    ids = torch.randint(1, VOCAB, (1, 6))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, cache_implementation="static")
    a = ref.generate(ids, **kw)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        b = fast.to(torch.bfloat16).generate(ids, **kw)
    base = ref.to(torch.bfloat16).generate(ids, **kw)
    assert torch.equal(b, base), f"{a.tolist()} {b.tolist()}"
    assert any("dense 4-D mask" in str(x.message) for x in w)


# ----------------------------------------------------------------------------------------------------------
# training plumbing


def test_gradient_checkpointing():
    ref, fast = model_pair("llama")
    fast.gradient_checkpointing_enable()
    fast.train()
    ref.train()
    compare(fast, ref, torch.bfloat16, torch.randint(1, VOCAB, (2, 8)))


def test_torch_compile_dense_path():
    """The dense path traces in one graph (fullgraph=True); the kernel is a torch.library custom op."""
    _, fast = model_pair("llama", layers=1)
    fast = fast.to(torch.bfloat16)
    ids = torch.randint(1, VOCAB, (2, 10))
    eager = fast(ids).logits
    torch._dynamo.reset()
    compiled = torch.compile(fast, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(ids).logits, eager, rtol=0, atol=0)


def test_torch_compile_packed_without_cache():
    """use_cache=False under compile: transformers always adds its packing overlay; the probe finds the
    sequences (value-dependent, so graph breaks, but the right answer)."""
    ref, fast = model_pair("llama", layers=1)
    _, batch = _packed_batch([4, 6])
    ids, pos = batch["input_ids"], batch["position_ids"]
    torch._dynamo.reset()
    compiled = torch.compile(fast.to(torch.bfloat16), backend="eager")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = compiled(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert not [x for x in w if issubclass(x.category, dispatch.FastKernFallbackWarning)], "fell back to SDPA"
    base = ref.to(torch.bfloat16)(input_ids=ids, position_ids=pos, use_cache=False).logits
    oracle = ref.double()(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert_close(got, oracle, base, torch.bfloat16, "output", "compiled packed logits")


# ----------------------------------------------------------------------------------------------------------
# the attention function directly: features against the reference, fallbacks, errors


class _Mod(torch.nn.Module):
    def __init__(self, is_causal=True):
        super().__init__()
        self.is_causal = is_causal


def _qkv(b=2, h=4, hk=2, sq=9, sk=9, d=16, dtype=torch.bfloat16):
    return (torch.randn(b, h, sq, d, dtype=dtype), torch.randn(b, hk, sk, d, dtype=dtype),
            torch.randn(b, hk, sk, d, dtype=dtype))


@pytest.mark.parametrize("case", [
    dict(causal=True), dict(causal=False), dict(causal=True, sliding_window=3), dict(causal=True, softcap=5.0),
    dict(causal=True, sq=1, sk=11), dict(causal=True, sq=4, sk=11, sliding_window=5),
], ids=["causal", "bidir", "window", "softcap", "decode", "chunked-prefill-window"])
def test_forward_features_vs_reference(case):
    case = dict(case)
    causal = case.pop("causal")
    shapes = {k: case.pop(k) for k in ("sq", "sk") if k in case}
    q, k, v = _qkv(**shapes)
    out, w = fk.fastkern_attention_forward(_Mod(causal), q, k, v, None, scaling=0.3, **case)
    assert w is None and out.shape == (2, q.shape[2], 4, 16) and out.is_contiguous()
    oracle = reference.attention(q.double(), k.double(), v.double(), causal=causal, scale=0.3, **case)
    base = reference.attention(q, k, v, causal=causal, scale=0.3, **case)
    assert_close(out, oracle.transpose(1, 2), base.transpose(1, 2), torch.bfloat16, "output", str(case))


@pytest.mark.parametrize("case", [dict(causal=True), dict(causal=True, sliding_window=3, softcap=5.0)],
                         ids=["causal", "window-softcap"])
def test_dense_path_is_one_autograd_node(case):
    """Host cost (issues 6/7): the dense path records one autograd node per layer (the kernel's Function; no
    transpose views), gradients reach q/k/v in their [batch, heads, seq, head_dim] layout, and they equal the
    kernel's own custom-op path bit for bit."""
    case = dict(case)
    causal = case.pop("causal")
    q, k, v = (t.requires_grad_(True) for t in _qkv())
    out, _ = fk.fastkern_attention_forward(_Mod(causal), q, k, v, None, scaling=0.3, **case)
    assert type(out.grad_fn).__name__ == "FlashAttnFunctionBackward"
    assert all(type(f).__name__ == "AccumulateGrad" for f, _ in out.grad_fn.next_functions[:3])
    dout = torch.randn(out.shape).to(out.dtype)
    out.backward(dout)
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    want = fk._kernels._flash_attn_fwd_op(q2.transpose(1, 2), k2.transpose(1, 2), v2.transpose(1, 2), None, None,
                                          9, 9, causal, 0.3, case.get("sliding_window", 0),
                                          case.get("softcap", 0.0))[0]
    want.backward(dout)
    assert torch.equal(out, want)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert a.grad.shape == a.shape and torch.equal(a.grad, b.grad)


def test_padding_mask_with_holes_and_window_falls_back():
    q, k, v = _qkv(b=1, sq=8, sk=8)
    mask = torch.tensor([[True, True, False, True, True, True, True, True]])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out, _ = fk.fastkern_attention_forward(_Mod(), q, k, v, mask, sliding_window=3)
    assert any("holes" in str(x.message) for x in w)
    dense = fk._dense_mask(mask, 1, 8, 8, True, 3, q.device)
    exp = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1), attn_mask=dense)
    torch.testing.assert_close(out[0, 1:].float(), exp.transpose(1, 2)[0, 1:], atol=2e-2, rtol=2e-2)


def test_one_warning_per_reason():
    q, k, v = _qkv(dtype=torch.float32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            fk.fastkern_attention_forward(_Mod(), q, k, v, None)
    assert len([x for x in w if issubclass(x.category, dispatch.FastKernFallbackWarning)]) == 1


def test_dropout_falls_back_once():
    q, k, v = _qkv()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(2):
            out, _ = fk.fastkern_attention_forward(_Mod(), q, k, v, None, dropout=0.5)
    assert out.shape == (2, 9, 4, 16)
    assert len([x for x in w if "dropout" in str(x.message)]) == 1


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: (q, k.float(), v, None), "share one dtype"),
    (lambda q, k, v: (q, k[..., :8], v, None), r"key must have shape \(2, kv_heads, kv_len, 16\)"),
    (lambda q, k, v: (q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1), None), "divisible"),
    (lambda q, k, v: (q, k, v[:, :, :5], None), r"value must have shape \(2, 2, 9, head_dim\)"),
    (lambda q, k, v: (q, k, v, torch.ones(2, 7, dtype=torch.bool)), r"attention_mask .* \(2, 9\)"),
    (lambda q, k, v: (q, k, v, torch.ones(2, 1, 9, 8, dtype=torch.bool)), r"attention_mask \(4-D\).*\(2, 1, 9, 9\)"),
    (lambda q, k, v: (q, k, v, torch.ones(2, 9, 9, dtype=torch.bool)), r"attention_mask must have shape"),
    (lambda q, k, v: (q[0], k, v, None), "query must have shape"),
], ids=["dtype", "head_dim", "heads", "value", "mask2d", "mask4d", "mask3d", "ndim"])
def test_bad_input_raises(bad, match):
    q, k, v = _qkv()
    q2, k2, v2, m = bad(q, k, v)
    with pytest.raises(ValueError, match=match):
        fk.fastkern_attention_forward(_Mod(), q2, k2, v2, m)


# ----------------------------------------------------------------------------------------------------------
# the mask function


def test_mask_function_outputs():
    from transformers import masking_utils as mu

    causal = mu.causal_mask_function
    assert fk.fastkern_mask(2, 5, 5, mask_function=causal, attention_mask=None) is None
    full = torch.ones(2, 5, dtype=torch.bool)
    assert fk.fastkern_mask(2, 5, 5, mask_function=causal, attention_mask=full) is None
    pad = full.clone()
    pad[0, :2] = False
    got = fk.fastkern_mask(2, 5, 5, mask_function=causal, attention_mask=pad)
    assert got.dtype == torch.bool and torch.equal(got, pad)
    # decode with a sliding-window cache: keys [kv_offset, kv_offset + kv_len) of the 2-D mask
    long = torch.ones(2, 12, dtype=torch.bool)
    long[1, :1] = False
    long[1, 9] = False
    got = fk.fastkern_mask(2, 1, 4, q_offset=11, kv_offset=8, mask_function=mu.sliding_window_causal_mask_function(4),
                           attention_mask=long)
    assert torch.equal(got, long[:, 8:12])
    # packed sequences: int32 segment ids
    seg = torch.tensor([[0, 0, 1, 1, 1]])
    packed = mu.and_masks(causal, mu.packed_sequence_mask_function(seg))
    got = fk.fastkern_mask(1, 5, 5, mask_function=packed, attention_mask=None)
    assert got.dtype == torch.int32 and torch.equal(got, seg.int())
    # an unknown overlay: transformers' own dense mask, so the attention falls back to SDPA
    custom = mu.or_masks(causal, lambda b, h, q, kv: kv == 0)
    got = fk.fastkern_mask(1, 5, 5, mask_function=custom, attention_mask=None, use_vmap=True)
    assert got.dim() == 4 and got.dtype == torch.bool
    # static cache: more keys than written positions
    got = fk.fastkern_mask(1, 1, 16, q_offset=torch.tensor(5), kv_offset=0, mask_function=causal,
                           attention_mask=torch.ones(1, 6, dtype=torch.bool))
    assert got.dim() == 4


# ----------------------------------------------------------------------------------------------------------
# dense backend choice (HF_FASTKERN_ATTENTION): auto / triton / sdpa


def test_dense_backend_env_values(monkeypatch):
    q = torch.zeros(1, 4, 8, 64, dtype=torch.bfloat16)
    monkeypatch.setenv(fk.ATTENTION_BACKEND_ENV, "nonsense")
    with pytest.raises(ValueError, match="HF_FASTKERN_ATTENTION"):
        fk._route_dense_to_sdpa(q, True, 8, 8)
    monkeypatch.setenv(fk.ATTENTION_BACKEND_ENV, "auto")
    assert not fk._route_dense_to_sdpa(q, True, 8, 8)  # auto follows the routing table: CPU tensors run the kernel
    monkeypatch.setenv(fk.ATTENTION_BACKEND_ENV, "triton")
    assert not fk._route_dense_to_sdpa(q, True, 8, 8)
    monkeypatch.setenv(fk.ATTENTION_BACKEND_ENV, "sdpa")
    assert fk._route_dense_to_sdpa(q, True, 8, 8) and fk._route_dense_to_sdpa(q, False, 1, 8)
    # KV-cache decoding is the routing table's "decode" case, not the plain dense one (CPU: the kernel)
    assert not fk._route_dense_to_sdpa(q, True, 1, 8)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_dense_backend_sdpa_matches_and_keeps_kernel_cases(arch, monkeypatch):
    """HF_FASTKERN_ATTENTION=sdpa: the plain dense case runs SDPA (same output as the sdpa model); sliding
    windows and padded batches still run the kernel."""
    monkeypatch.setenv(fk.ATTENTION_BACKEND_ENV, "sdpa")
    torch.manual_seed(0)
    cfg = make_config(arch)
    if arch == "mistral":
        cfg.sliding_window = 8
    ref, fast = pair_from_config(cfg)
    calls = KernelCalls(monkeypatch)
    ids = torch.randint(1, VOCAB, (2, 24))
    compare(fast, ref, torch.bfloat16, ids)
    assert (calls.dense > 0) == (arch == "mistral")  # the window keeps Mistral on the kernel
    am = torch.ones_like(ids)
    am[0, :5] = 0
    compare(fast, ref, torch.bfloat16, ids, select=am.bool(), attention_mask=am)
    assert calls.varlen > 0


# ----------------------------------------------------------------------------------------------------------
# GPU: real-ish sizes, bf16 on CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_model_matches_sdpa_2k(arch, monkeypatch):
    torch.manual_seed(0)
    cfg = make_config(arch, head_dim=128, heads=4, kv_heads=2)
    if arch == "mistral":
        cfg.sliding_window = 512
    ref, fast = pair_from_config(cfg, "cuda")
    calls = KernelCalls(monkeypatch)
    ids = torch.randint(1, VOCAB, (2, 2048), device="cuda")
    compare(fast, ref, torch.bfloat16, ids)
    am = torch.ones_like(ids)
    am[0, :300] = 0
    am[1, 1700:] = 0
    compare(fast, ref, torch.bfloat16, ids, select=am.bool(), attention_mask=am,
            labels=ids.masked_fill(am == 0, -100))
    assert calls.dense > 0 and calls.varlen > 0


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_gpu_packed_2k_matches_separate(arch, monkeypatch):
    torch.manual_seed(0)
    cfg = make_config(arch, head_dim=128, heads=4, kv_heads=2)
    if arch == "mistral":
        cfg.sliding_window = 256
    ref, fast = pair_from_config(cfg, "cuda")
    calls = KernelCalls(monkeypatch)
    feats, batch = _packed_batch([700, 1100, 248])
    fm = copy.deepcopy(fast).to(torch.bfloat16)
    packed = fm(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda()).logits[0]
    start = 0
    for f in feats:
        ids = torch.tensor([f["input_ids"]], device="cuda")
        n = ids.shape[1]
        oracle = copy.deepcopy(ref).double()(ids).logits[0]
        base = copy.deepcopy(ref).to(torch.bfloat16)(ids).logits[0]
        assert_close(packed[start:start + n], oracle, base, torch.bfloat16, "output", f"packed seq at {start}")
        start += n
    assert calls.varlen > 0


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_gpu_generate_32_tokens(arch):
    """Greedy 32 tokens in bf16 on the GPU. Criterion: fastkern's tokens equal sdpa's bf16 tokens; if they do not,
    every token up to the first difference must agree, and the first difference must be a near tie of the fp32
    model (top-2 fp32 logit gap < 2 bf16 roundings of the logit scale), which bf16 rounding can flip."""
    torch.manual_seed(0)
    cfg = make_config(arch, head_dim=128, heads=4, kv_heads=2)
    if arch == "mistral":
        cfg.sliding_window = 24
    ref, fast = pair_from_config(cfg, "cuda")
    ids = torch.randint(1, VOCAB, (2, 40), device="cuda")
    am = torch.ones_like(ids)
    am[1, :9] = 0
    kw = dict(max_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None)
    a = ref.to(torch.bfloat16).generate(ids, attention_mask=am, **kw)
    b = fast.to(torch.bfloat16).generate(ids, attention_mask=am, **kw)
    if torch.equal(a, b):
        return
    ref32 = ref.float()
    for row in range(a.shape[0]):
        diff = (a[row] != b[row]).nonzero()
        if diff.numel() == 0:
            continue
        t = int(diff[0])
        prefix = a[row:row + 1, :t]
        pm = torch.ones_like(prefix)
        pm[0, :am.shape[1]] = am[row]
        logits = ref32(prefix, attention_mask=pm).logits[0, -1]
        top = logits.topk(2).values
        gap = float(top[0] - top[1])
        assert gap < 2 * 2.0**-7 * float(logits.abs().max()), (
            f"{arch}: tokens differ at {t} with fp32 top-2 gap {gap:.3e} (not a near tie)")


@pytest.mark.gpu
def test_gpu_auto_backend_routes_dense_on_hopper(monkeypatch):
    """The default backend ("auto") on an H100: dense causal attention of a 2K-token Llama runs SDPA (cuDNN),
    matches the sdpa model by the tolerance rule; deterministic mode keeps the kernel."""
    monkeypatch.setenv(fk.ATTENTION_BACKEND_ENV, "auto")
    monkeypatch.setenv(routing.MODE_ENV, "table")  # conftest pins "kernel" for the kernel tests; this tests "auto"
    hopper = torch.cuda.get_device_capability()[0] == 9
    torch.manual_seed(0)
    cfg = make_config("llama", head_dim=128, heads=4, kv_heads=2)
    ref, fast = pair_from_config(cfg, "cuda")
    calls = KernelCalls(monkeypatch)
    ids = torch.randint(1, VOCAB, (2, 2048), device="cuda")
    compare(fast, ref, torch.bfloat16, ids)
    assert (calls.dense == 0) == hopper
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        q = torch.zeros(1, 4, 8, 128, device="cuda", dtype=torch.bfloat16)
        assert not fk._route_dense_to_sdpa(q, True, 8, 8)
    finally:
        torch.use_deterministic_algorithms(False)


# --- edge cases ---


def _tiny_llama(attn: str, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=64, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bfloat16"])
def test_model_batch_row_all_padding(dtype, device):
    """A batch whose second row is entirely padding (attention_mask all zero): logits and every gradient
    finite, and the real row matches the unpadded computation (fp64 eager oracle, sdpa same-dtype baseline)."""
    ids = torch.randint(0, 64, (2, 9), device=device)
    mask = torch.ones(2, 9, dtype=torch.long, device=device)
    mask[1] = 0
    model = _tiny_llama("fastkern", dtype).to(device)
    out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(out).all(), "all-padding row produced non-finite logits"
    out[0].float().sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"non-finite gradient in {n}"
    oracle = _tiny_llama("eager", torch.float64).to(device)
    base = _tiny_llama("sdpa", dtype).to(device)
    with torch.no_grad():
        ref0 = oracle(input_ids=ids[:1]).logits[0]
        base0 = base(input_ids=ids[:1]).logits[0]
    assert_close(out[0].detach(), ref0, base0, dtype, "output", "logits of the real row next to a padding row")


def _attention_fns():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


    assert "fastkern" in ALL_ATTENTION_FUNCTIONS, "importing hf_fastkern must register 'fastkern'"
    return ALL_ATTENTION_FUNCTIONS["fastkern"], ALL_ATTENTION_FUNCTIONS["sdpa"]


class _Attn(torch.nn.Module):
    """The attributes transformers' attention functions read from the calling module."""

    def __init__(self, causal: bool, groups: int):
        super().__init__()
        self.is_causal = causal
        self.num_key_value_groups = groups
        self.training = False


@pytest.mark.parametrize("mask_kind", ["additive_-inf", "bool"])
@pytest.mark.parametrize("dtype", LOW, ids=dtype_ids(LOW))
def test_attention_function_mask_with_minus_inf(mask_kind, dtype, device):
    """A dense 4-D mask with -inf (or False) on padded keys: "fastkern" either uses it or falls back to SDPA,
    never a wrong answer (oracle: sdpa in fp64; baseline: sdpa in the same dtype)."""
    fast, sdpa = _attention_fns()
    b, h, hk, s, d = 2, 4, 2, 11, 16
    module = _Attn(causal=True, groups=h // hk)
    q = torch.randn(b, h, s, d, device=device)
    k = torch.randn(b, hk, s, d, device=device)
    v = torch.randn(b, hk, s, d, device=device)
    keep = torch.ones(b, s, dtype=torch.bool, device=device)
    keep[1, :3] = False  # left padding of the second row: queries 0..2 see only padded keys -> skip them
    causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
    allowed = causal[None, None] & keep[:, None, None, :]  # [b, 1, s, s]
    if mask_kind == "bool":
        mask = allowed
    else:
        mask = torch.zeros(b, 1, s, s, device=device).masked_fill(~allowed, float("-inf"))

    def call(fn, dt, grad):
        ins = [t.to(dt).requires_grad_(grad) for t in (q, k, v)]
        m = mask if mask.dtype == torch.bool else mask.to(dt)
        o, _ = fn(module, *ins, attention_mask=m, dropout=0.0, scaling=d ** -0.5)
        return o, ins

    out, ins = call(fast, dtype, True)
    base, b_ins = call(sdpa, dtype, True)
    ref, r_ins = call(sdpa, torch.float64, True)
    rows = keep.clone()  # queries that see at least one key: all but the left-padded ones
    sel = rows[:, :, None, None].expand_as(out)  # output is [batch, seq, heads, head_dim]
    assert_close(out[sel].detach(), ref[sel].detach(), base[sel].detach(), dtype, "output", f"{mask_kind} mask")
    g = torch.randn(out.shape, device=device) * sel
    for o in (out, base, ref):
        o.backward(g.to(o.dtype))
    for j in range(3):
        assert torch.isfinite(ins[j].grad).all(), f"non-finite grad of input {j}"
        assert_close(ins[j].grad, r_ins[j].grad, b_ins[j].grad, dtype, "grad", f"{mask_kind} mask grad[{j}]")
