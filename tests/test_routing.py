"""The routing tables (hf_fastkern.kernels.routing): a decision per case read from a table, stock where the table
cannot vouch, clear errors for malformed tables, and the attention / norm call sites following them."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_routing
from hf_fastkern.kernels import layer_norm as ln_mod
from hf_fastkern.kernels import reference, routing
from hf_fastkern.kernels import rms_norm as rms_mod
from hf_fastkern.patches import attention as fk
from tests.harness import CallCounter
from tests.tolerances import assert_close


def _doc(rules: dict, cls: str = "fakegpu") -> dict:
    return {"schema": 1, "gpu_class": cls,
            "provenance": {"command": "python benchmarks/bench_routing.py --out x.json", "gpu": "Fake GPU",
                           "versions": {"torch": "2.11"}, "date": "2026-12-07"},
            "ops": rules}


FAKE = _doc({
    "attention": [
        {"match": {"kind": "dense", "head_dim": 128, "kv_len": [64, 8192]}, "choice": "kernel", "ratio": 1.2},
        {"match": {"kind": "dense", "head_dim": 256}, "choice": "stock", "ratio": 0.7},
        {"match": {"kind": "decode", "q_len": [1, 16], "kv_len": [None, 4096]}, "choice": "kernel", "ratio": 1.1},
        {"match": {"kind": "packed", "window": True}, "choice": "kernel"},
    ],
    "rms_norm": [{"match": {"tokens": [4096, None], "grad": True}, "choice": "kernel", "ratio": 1.4}],
})


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "fake.json"
    path.write_text(json.dumps(FAKE))
    monkeypatch.setenv(routing.TABLE_ENV, str(path))
    monkeypatch.delenv(routing.MODE_ENV, raising=False)
    routing.reset()
    yield routing.load_table("fakegpu")
    routing.reset()


def _attn(**kw):
    case = dict(kind="dense", head_dim=128, q_len=2048, kv_len=2048, causal=True, window=False, softcap=False,
                grad=True)
    case.update(kw)
    return case


@pytest.mark.parametrize("case, want", [
    (_attn(), "kernel"),
    (_attn(q_len=64, kv_len=64), "kernel"),  # inclusive range ends
    (_attn(q_len=8192, kv_len=8192), "kernel"),
    (_attn(q_len=16384, kv_len=16384), "stock"),  # outside the measured grid
    (_attn(q_len=32, kv_len=32), "stock"),
    (_attn(head_dim=64), "stock"),  # no rule names it
    (_attn(head_dim=256), "stock"),  # measured slower (Pythia / Gemma)
    (_attn(kind="decode", q_len=1, kv_len=4096), "kernel"),
    (_attn(kind="decode", q_len=16, kv_len=32768), "stock"),  # long cache: not vouched for
    (_attn(kind="decode", q_len=17, kv_len=1024), "stock"),
    (_attn(kind="packed", window=True), "kernel"),
    (_attn(kind="packed", window=False), "stock"),
    (_attn(kind="padded"), "stock"),
], ids=["dense2k", "lo-end", "hi-end", "outside", "d64", "d256", "decode4k", "decode32k", "q17", "packed-win",
        "packed", "padded", "below"])
def test_decision_per_case(table, case, want):
    choice, why = routing.decide("attention", "fakegpu", case)
    assert choice == want, why
    assert "fake.json" in why


def test_norm_decisions(table):
    assert routing.decide("rms_norm", "fakegpu", {"tokens": 8192, "hidden": 4096, "grad": True})[0] == "kernel"
    assert routing.decide("rms_norm", "fakegpu", {"tokens": 128, "hidden": 4096, "grad": True})[0] == "stock"
    assert routing.decide("rms_norm", "fakegpu", {"tokens": 8192, "hidden": 4096, "grad": False})[0] == "stock"
    # an op the table has no rules for
    assert routing.decide("layer_norm", "fakegpu", {"tokens": 8192, "hidden": 4096, "grad": True})[0] == "stock"


def test_missing_table_is_stock(monkeypatch):
    monkeypatch.delenv(routing.TABLE_ENV, raising=False)
    monkeypatch.delenv(routing.MODE_ENV, raising=False)
    routing.reset()
    choice, why = routing.decide("attention", "no-such-gpu-9000", _attn())
    assert choice == "stock" and "no routing table" in why
    assert routing.load_table("no-such-gpu-9000") is None


def test_not_cuda_runs_kernel_and_modes(monkeypatch):
    monkeypatch.delenv(routing.MODE_ENV, raising=False)
    assert routing.decide("attention", None, _attn())[0] == "kernel"  # the CPU interpreter runs the kernels
    assert routing.use_kernel("rms_norm", torch.device("cpu"), tokens=1, hidden=8, grad=False)
    monkeypatch.setenv(routing.MODE_ENV, "stock")
    assert routing.decide("attention", "fakegpu", _attn())[0] == "stock"
    assert not routing.use_kernel("rms_norm", torch.device("cpu"), tokens=1, hidden=8, grad=False)
    monkeypatch.setenv(routing.MODE_ENV, "kernel")
    assert routing.decide("attention", "no-such-gpu", _attn())[0] == "kernel"
    monkeypatch.setenv(routing.MODE_ENV, "fastest")
    with pytest.raises(ValueError, match=routing.MODE_ENV):
        routing.decide("attention", "fakegpu", _attn())


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema=2), "schema must be 1"),
    (lambda d: d.pop("provenance"), "provenance must be an object"),
    (lambda d: d["provenance"].pop("command"), "provenance must be an object with command"),
    (lambda d: d["ops"].update(softmax=[]), "unknown op 'softmax'"),
    (lambda d: d["ops"]["attention"][0].update(choice="triton"), r"ops.attention\[0\].choice must be"),
    (lambda d: d["ops"]["attention"][0]["match"].update(seq=4), r"ops.attention\[0\].match has key 'seq'"),
    (lambda d: d["ops"]["attention"][0]["match"].update(kv_len=[1, 2, 3]), r"match.kv_len must be \[lo, hi\]"),
    (lambda d: d["ops"]["rms_norm"][0].update(ratio="fast"), r"ratio must be a number"),
], ids=["schema", "no-provenance", "no-command", "unknown-op", "bad-choice", "bad-key", "bad-range", "bad-ratio"])
def test_malformed_table_raises_clearly(tmp_path, monkeypatch, mutate, message):
    doc = json.loads(json.dumps(FAKE))
    mutate(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    monkeypatch.setenv(routing.TABLE_ENV, str(path))
    monkeypatch.delenv(routing.MODE_ENV, raising=False)
    routing.reset()
    with pytest.raises(routing.RoutingTableError, match=message) as e:
        routing.decide("attention", "fakegpu", _attn())
    assert "bad.json" in str(e.value)
    routing.reset()


def test_not_json_raises(tmp_path, monkeypatch):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    monkeypatch.setenv(routing.TABLE_ENV, str(path))
    routing.reset()
    with pytest.raises(routing.RoutingTableError, match="broken.json: is not valid JSON"):
        routing.load_table("fakegpu")
    routing.reset()


@pytest.mark.parametrize("name, cls", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100"),
                                       ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
                                       ("NVIDIA GeForce RTX 4090", "nvidia-geforce-rtx-4090")])
def test_gpu_class_of_name(name, cls):
    assert routing.gpu_class_of_name(name) == cls


def test_shipped_tables_parse_and_carry_provenance():
    paths = sorted(routing.ROUTING_DIR.glob("*.json"))
    assert paths, "the package ships at least the H100 table"
    for p in paths:
        t = routing.read_table(p)
        assert t.gpu_class == p.stem
        assert t.provenance["command"].startswith("python -m benchmarks.bench_routing")
    h100 = routing.read_table(routing.ROUTING_DIR / "h100.json")
    # measured (docs/routing.md): head_dim 256 dense training 0.28x SDPA, dense head_dim 128 0.68x -> SDPA;
    # packed training 3.0x at 2K, padded 1.9x at 4K, window 3.0x at 8K -> the kernel
    assert h100.decide("attention", _attn(head_dim=256, q_len=4096, kv_len=4096))[0] == "stock"
    assert h100.decide("attention", _attn(q_len=4096, kv_len=4096))[0] == "stock"
    assert h100.decide("attention", _attn(kind="packed"))[0] == "kernel"
    assert h100.decide("attention", _attn(kind="padded", q_len=4096, kv_len=4096))[0] == "kernel"
    assert h100.decide("attention", _attn(window=True, q_len=8192, kv_len=8192))[0] == "kernel"
    # decoding was never measured against SDPA: stock
    assert h100.decide("attention", _attn(kind="decode", q_len=1, kv_len=32768, grad=False))[0] == "stock"


def test_describe_prints_the_table(table, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(routing, "gpu_class", lambda device=None: "fakegpu")
    routing.print_routing()
    out = capsys.readouterr().out
    assert "Fake GPU" in out and "bench_routing.py --out x.json" in out
    assert "kernel kind=dense, head_dim=128, kv_len 64..8192" in out
    # RoPE without a rule in the table keeps the kernel, and info says so; with rules they are listed
    assert "rope: no rule: the fused RoPE kernel runs wherever it applies" in out
    doc = _doc({"rope": [{"match": {"tokens": [1, None]}, "choice": "kernel", "ratio": 1.5}]})
    path = tmp_path / "rope_table.json"
    path.write_text(json.dumps(doc))
    monkeypatch.setenv(routing.TABLE_ENV, str(path))
    routing.reset()
    text = "\n".join(routing.describe())
    assert "rope: 1 rule(s), first match wins" in text and "kernel tokens 1.." in text and "rope: no rule" not in text
    assert "fused_loss: no rule: the fused linear cross-entropy computes every training loss" in text
    monkeypatch.setattr(routing, "gpu_class", lambda device=None: None)
    assert "routing does not apply" in routing.describe()[0]


def test_seed_rules_follow_the_committed_results():
    rules, used, env = bench_routing.seed_rules("benchmarks/results/h100")
    assert env["gpu"].startswith("NVIDIA H100") and used
    doc = bench_routing.table_doc("h100", bench_routing.provenance("cmd", env["gpu"], {}, "d"), rules)
    t = routing.parse_table(doc, "seed")
    # attention.json: fwd+bwd 0.70-0.76x cuDNN at D128 -> stock; rms_norm.json: 1.4x torch at 4096 x 2048 -> kernel
    assert t.decide("attention", _attn(q_len=8192, kv_len=8192))[0] == "stock"
    assert t.decide("rms_norm", {"tokens": 8192, "hidden": 2048, "grad": True})[0] == "kernel"
    assert t.decide("rms_norm", {"tokens": 128, "hidden": 2048, "grad": True})[0] == "stock"  # not measured


def test_family_rules_need_both_ends():
    rules = bench_routing.family_rules("glu", {"grad": True}, "tokens", [(16, 0.8), (128, 1.5), (1024, 1.3)], "s")
    t = routing.parse_table(_doc({"glu": rules}), "x")
    case = lambda n: {"tokens": n, "intermediate": 8, "grad": True}  # noqa: E731
    # above 1024: the top two points won, so a bandwidth-bound op keeps the kernel (next test)
    assert [t.decide("glu", case(n))[0] for n in (8, 16, 64, 128, 500, 1024, 2048)] == \
        ["stock", "stock", "stock", "kernel", "kernel", "kernel", "kernel"]


# ----------------------------------------------------------------------------------------------------------
# call sites


def _cuda_like(monkeypatch, cls="fakegpu"):
    """Route CPU tensors as if they lived on a GPU of class ``cls`` (the call sites read routing.use_kernel)."""
    real = routing.use_kernel

    def fake(op, device, **case):
        return routing.decide(op, cls, case)[0] == routing.KERNEL
    monkeypatch.setattr(routing, "use_kernel", fake)
    return real


def test_attention_call_site_routes_per_case(table, monkeypatch):
    _cuda_like(monkeypatch)
    monkeypatch.setenv(fk.ATTENTION_BACKEND_ENV, "auto")
    calls = {"kernel": 0, "stock": 0}
    real_kernel, real_stock = fk._kernels.flash_attention_heads_first, fk._stock
    real_decode = fk._decode.flash_decode_heads_first

    def k(*a, **kw):
        calls["kernel"] += 1
        return real_kernel(*a, **kw)

    def kd(*a, **kw):  # cached steps without gradients: the split-KV kernel
        calls["kernel"] += 1
        return real_decode(*a, **kw)

    def s(*a, **kw):
        calls["stock"] += 1
        return real_stock(*a, **kw)
    monkeypatch.setattr(fk._kernels, "flash_attention_heads_first", k)
    monkeypatch.setattr(fk._decode, "flash_decode_heads_first", kd)
    monkeypatch.setattr(fk, "_stock", s)
    mod = torch.nn.Module()
    mod.is_causal = True
    torch.manual_seed(0)
    for d, sq, sk, want in ((128, 64, 64, "kernel"), (256, 64, 64, "stock"), (64, 16, 16, "stock"),
                            (64, 1, 256, "kernel"), (64, 4, 8192, "stock")):
        q = torch.randn(1, 2, sq, d, dtype=torch.bfloat16)
        kk = torch.randn(1, 1, sk, d, dtype=torch.bfloat16)
        v = torch.randn(1, 1, sk, d, dtype=torch.bfloat16)
        before = dict(calls)
        with torch.no_grad():
            out, _ = fk.fastkern_attention_forward(mod, q, kk, v, None)
        assert calls[want] == before[want] + 1, (d, sq, sk, want)
        # both paths compute the same attention (bottom-right causal for the decode cases)
        oracle = reference.attention(q.double(), kk.double(), v.double(), causal=True).transpose(1, 2)
        baseline = reference.attention(q, kk, v, causal=True).transpose(1, 2)
        assert_close(out, oracle, baseline, torch.bfloat16, name=f"attention d{d} {sq}x{sk} ({want})")


def test_rms_norm_call_site_routes(table, monkeypatch):
    _cuda_like(monkeypatch)
    calls = []
    monkeypatch.setattr(rms_mod.RMSNormFunction, "apply", lambda *a: calls.append(a) or reference.rms_norm(
        a[0], a[1], a[2], a[3], a[4]))
    x = torch.randn(8, 64, requires_grad=True)
    w = torch.ones(64, requires_grad=True)
    rms_mod.rms_norm(x, w)  # 8 tokens: outside the fake table's 4096+ -> stock (the reference)
    assert not calls
    monkeypatch.setenv(routing.MODE_ENV, "kernel")
    rms_mod.rms_norm(x, w)
    assert len(calls) == 1
    # layer_norm: the fake table has no rules -> stock
    monkeypatch.delenv(routing.MODE_ENV)
    lcalls = []
    monkeypatch.setattr(ln_mod.LayerNormFunction, "apply", lambda *a: lcalls.append(a))
    ln_mod.layer_norm(x, w, None)
    assert not lcalls


@pytest.mark.gpu
def test_gpu_attention_follows_this_gpus_table(monkeypatch):
    """On the device, table mode: head_dim 256 training and KV-cache decoding take the path this GPU's table
    names (stock when it has no table or no rule), and either path computes the oracle's attention."""
    monkeypatch.delenv(routing.MODE_ENV, raising=False)
    monkeypatch.delenv(routing.TABLE_ENV, raising=False)
    monkeypatch.setenv(fk.ATTENTION_BACKEND_ENV, "auto")
    routing.reset()
    cls = routing.gpu_class("cuda")
    table = routing.load_table(cls)
    calls = []
    real = fk._stock
    monkeypatch.setattr(fk, "_stock", lambda *a, **k: calls.append(1) or real(*a, **k))
    mod = torch.nn.Module()
    mod.is_causal = True
    torch.manual_seed(0)
    for d, sq, sk, kind, grad in ((256, 1024, 1024, "dense", True), (128, 1, 8192, "decode", False),
                                  (128, 16, 8192, "decode", False)):
        q = torch.randn(2, 8, sq, d, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
        k = torch.randn(2, 2, sk, d, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
        v = torch.randn(2, 2, sk, d, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
        case = dict(kind=kind, head_dim=d, q_len=sq, kv_len=sk, causal=True, window=False, softcap=False,
                    grad=grad)
        want = table.decide("attention", case)[0] if table is not None else routing.STOCK
        n = len(calls)
        with torch.set_grad_enabled(grad):
            out, _ = fk.fastkern_attention_forward(mod, q, k, v, None)
        assert (len(calls) == n + 1) == (want == routing.STOCK), (cls, case, want)
        oracle = reference.attention(q.double(), k.double(), v.double(), causal=True).transpose(1, 2)
        baseline = reference.attention(q.detach(), k.detach(), v.detach(), causal=True).transpose(1, 2)
        assert_close(out.detach(), oracle, baseline, torch.bfloat16, name=f"{kind} d{d} {sq}x{sk} ({want})")
    routing.reset()


def test_rules_from_rows_merge_runs_and_keep_the_worst_variant(tmp_path):
    """Rows of several bench_routing runs (each within the device's time limit) make one table: a point's ratio
    is its worst variant's, out of memory is a loss, and measured rules come ahead of seeded ones."""
    fixed = {"kind": "decode", "head_dim": 128, "q_len": [1, 16], "causal": True, "window": False,
             "softcap": False, "grad": False}

    def row(x, b, ratio=None, error=None):
        r = {"op": "attention", "kind": "decode", "b": b, "d": 128, "sq": 1, "sk": x, "kv_len": x,
             "family": {"fixed": fixed, "sweep": "kv_len", "x": x}}
        r.update({"error": error} if error else {"ratio": ratio})
        return r
    rows = [row(512, 1, 1.5), row(512, 16, 1.2), row(2048, 1, 1.6), row(2048, 16, 1.1),
            row(8192, 1, 1.4), row(8192, 16, error="out of memory")]
    # a row written before rows carried their family (the 2026-12-07 forward rows): mapped like attention_grid
    old = {"op": "attention", "kind": "packed", "b": 8, "h": 16, "hk": 4, "d": 128, "sq": 2048, "sk": 2048,
           "grad": False, "kv_len": 2048, "ratio": 3.0}
    rules = bench_routing.rules_from_rows(rows + [old], "rows.json")
    seeded = {"attention": [{"match": {"kind": "decode"}, "choice": "kernel", "ratio": 9.0, "source": "seed"}]}
    t = routing.parse_table(_doc(bench_routing.merge_rules(rules, seeded)), "x")
    dec = lambda kv: t.decide("attention", _attn(kind="decode", q_len=1, kv_len=kv, grad=False))[0]  # noqa: E731
    assert [dec(kv) for kv in (512, 1024, 2048, 4096, 8192)] == ["kernel", "kernel", "kernel", "stock", "stock"]
    assert dec(100_000) == "kernel"  # outside the measured grid: the seeded rule after them decides
    assert t.decide("attention", _attn(kind="packed", q_len=2048, kv_len=2048, grad=False))[0] == "kernel"


def test_narrowed_scan_decides_like_the_full_scan():
    """decide() scans only the rules whose exact-match keys agree with the case (a decoding step misses the
    decision cache every token): the first matching rule, hence the choice and its source, is the full scan's."""
    import random

    table = routing.read_table(routing.ROUTING_DIR / "h100.json")

    def full_scan(op, case):
        for rule in table.rules.get(op, ()):
            if rule.matches(case):
                return rule
        return None

    rng = random.Random(0)
    for _ in range(3000):
        case = _attn(kind=rng.choice(routing.ATTENTION_KINDS), head_dim=rng.choice([64, 96, 128, 256]),
                     q_len=rng.choice([1, 16, 100, 2048]), kv_len=rng.randint(1, 200_000),
                     causal=rng.choice([True, False]), window=rng.choice([True, False]),
                     softcap=rng.choice([True, False]), grad=rng.choice([True, False]))
        rule = full_scan("attention", case)
        choice, why = table.decide("attention", case)
        assert choice == (rule.choice if rule else routing.STOCK), case
        if rule is not None:
            assert rule.source in why, (case, why)
    # a key that is a range in one rule and exact in none: every rule naming it stays a candidate
    t = routing.parse_table(_doc({"glu": [{"match": {"tokens": [1, 8]}, "choice": "stock", "ratio": 0.5},
                                          {"match": {"intermediate": 8}, "choice": "kernel", "ratio": 2.0}]}), "x")
    assert t.decide("glu", {"tokens": 4, "intermediate": 8, "grad": True})[0] == "stock"
    assert t.decide("glu", {"tokens": 16, "intermediate": 8, "grad": True})[0] == "kernel"
    assert t.decide("glu", {"tokens": 16, "intermediate": 9, "grad": True})[0] == "stock"


def test_qlora_linear_routes_to_stock_until_measured(table, tmp_path, monkeypatch):
    """No qlora_linear rule in the GPU's table: every case is stock, and the report's reason says so; a measured
    kernel rule routes its cases to the fused QLoRA linear and clears the reason."""
    monkeypatch.setattr(routing, "gpu_class", lambda device=None: "fakegpu")
    case = dict(tokens=8192, in_features=4096, out_features=14336, grad=True)
    assert routing.decide("qlora_linear", "fakegpu", case)[0] == routing.STOCK
    why = routing.unrouted_reason("qlora_linear", torch.device("cuda"))
    assert "no qlora_linear case measured faster" in why, why
    assert routing.unrouted_reason("qlora_linear", torch.device("cpu")) == ""
    path = tmp_path / "q.json"
    path.write_text(json.dumps(_doc({"qlora_linear": [
        {"match": {"in_features": 4096, "out_features": 14336, "grad": True, "tokens": [2048, 16384]},
         "choice": "kernel", "ratio": 1.1}]})))
    monkeypatch.setenv(routing.TABLE_ENV, str(path))
    routing.reset()
    assert routing.decide("qlora_linear", "fakegpu", case)[0] == routing.KERNEL
    assert routing.decide("qlora_linear", "fakegpu", dict(case, tokens=512))[0] == routing.STOCK
    assert routing.unrouted_reason("qlora_linear", torch.device("cuda")) == ""


def test_bench_routing_qlora_part_cpu_smoke():
    """The qlora part measures PEFT's 4-bit forward against the fused node and writes a table that parses."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    rules, rows = bench_routing.measure(quick=False, smoke=True, log=lambda s: None, parts=("qlora",))
    assert set(rules) == set(routing.CASE_KEYS)
    assert len(rows) == 4 and all(r["op"] == "qlora_linear" and r["stock_ms"] > 0 for r in rows)
    doc = bench_routing.table_doc("cpu-smoke", bench_routing.provenance("c", "cpu", {}, "d"), rules)
    # per grad family: 2 points + 1 interval, and an open range above when both points won (CPU timing decides)
    assert 6 <= len(routing.parse_table(doc, "smoke.json").rules["qlora_linear"]) <= 8


def test_gelu_call_site_routes_to_f_gelu_without_a_rule(table, monkeypatch, tmp_path):
    """The plain GELU (GPT-2 / GPT-NeoX MLPs) has no measured rule: on a GPU class it runs F.gelu in the input's
    dtype (what the unpatched module runs), with the reference's values; a table rule sends it to the kernel."""
    from hf_fastkern.kernels import activations
    _cuda_like(monkeypatch)
    launches = CallCounter(activations._apply)
    monkeypatch.setattr(activations, "_apply", launches)
    x = torch.randn(5, 96, dtype=torch.bfloat16)
    for approximate in ("none", "tanh"):
        out = activations.gelu(x, approximate)
        assert launches.calls == 0
        assert torch.equal(out, reference.gelu(x, approximate))  # one rounding of the fp32 result, both ways
    rule = {"match": {"features": 96}, "choice": "kernel", "ratio": 1.2}
    tmp = tmp_path / "gelu.json"
    tmp.write_text(json.dumps(_doc({"gelu": [rule]})))
    monkeypatch.setenv(routing.TABLE_ENV, str(tmp))
    routing.reset()
    activations.gelu(x.float(), "tanh")
    assert launches.calls == 1


def test_rows_of_several_runs_count_with_the_worst_run():
    """A case two runs measured counts with its worse ratio (a rerun can only move a point to stock), and a
    decoding row lands in its q_len family (1, or 2-16) whatever family it was written with."""
    def row(sq, ratio):
        return {"op": "attention", "kind": "decode", "b": 1, "d": 128, "sq": sq, "sk": 4096, "kv_len": 4096,
                "ratio": ratio, "family": {"fixed": {"kind": "decode", "q_len": [1, 16]}, "sweep": "kv_len",
                                           "x": 4096}}
    rules = bench_routing.rules_from_rows([row(1, 1.5), row(16, 3.0), row(1, 0.9), row(2, 2.5)], "runs")
    t = routing.parse_table(_doc(rules), "x")
    dec = lambda q: t.decide("attention", _attn(kind="decode", q_len=q, kv_len=4096, grad=False))  # noqa: E731
    assert dec(1)[0] == "stock"  # 1.5 then 0.9: the worse run decides
    assert [dec(q)[0] for q in (2, 7, 16)] == ["kernel"] * 3  # 2-16: worst of q_len 2 and 16 is 2.5
    assert dec(17)[0] == "stock"  # outside every family


def test_glu_routed_to_stock_runs_transformers_expression_in_dtype(table, monkeypatch):
    """SwiGLU/GeGLU that the table keeps on PyTorch run ``act(gate) * up`` in the inputs' dtype, as transformers'
    MLPs do (not the fp32 reference, whose backward saves fp32 copies)."""
    from hf_fastkern.kernels import activations
    _cuda_like(monkeypatch)
    launches = CallCounter(activations._apply)
    monkeypatch.setattr(activations, "_apply", launches)
    g = torch.randn(3, 7, 40, dtype=torch.bfloat16, requires_grad=True)  # a shape no other test uses
    u = torch.randn(3, 7, 40, dtype=torch.bfloat16, requires_grad=True)
    out = activations.swiglu(g, u)
    assert torch.equal(out, torch.nn.functional.silu(g) * u) and out.dtype == torch.bfloat16
    out = activations.geglu(g, u, "tanh")
    assert torch.equal(out, torch.nn.functional.gelu(g, approximate="tanh") * u)
    assert launches.calls == 0
    # saved for backward: bf16 tensors only (the reference path would save fp32 upcasts)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        activations.swiglu(g, u).sum().backward()
    assert saved and all(dt == torch.bfloat16 for dt in saved)


def test_mlp_recompute_threshold_yields_to_the_checkpoint_planner():
    """A patched MLP passes RECOMPUTE_MIN_TOKENS to glu_down, or 0 while the checkpoint planner has set the
    layer's mode (its "cheap" mode recomputes at any size)."""
    from hf_fastkern.layers import fused_mlp
    m = torch.nn.Module()
    assert fused_mlp.recompute_min_tokens(m) == fused_mlp.RECOMPUTE_MIN_TOKENS
    m.__dict__[fused_mlp.STORE_ACTIVATION] = False  # planner: cheap
    assert fused_mlp.recompute_min_tokens(m) == 0 and fused_mlp.recompute_for(m, True)
    m.__dict__[fused_mlp.STORE_ACTIVATION] = True  # planner: keep
    assert fused_mlp.recompute_min_tokens(m) == 0 and not fused_mlp.recompute_for(m, True)


def test_report_names_gelu_mlps_routed_to_stock(monkeypatch):
    """GPT-NeoX's plain GELU MLP is patched, and the report says when the routing keeps its GELU on F.gelu."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from hf_fastkern import apply_fast_kernels, report
    cfg = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        vocab_size=64, max_position_embeddings=32)
    model = GPTNeoXForCausalLM(cfg)
    apply_fast_kernels(model, attention=False, cross_entropy=False)
    assert "F.gelu" not in str(report(model))  # CPU: the kernel runs
    monkeypatch.setenv(routing.MODE_ENV, routing.STOCK)
    text = str(report(model))
    assert "fallback mlp" in text and "its GELU runs F.gelu: routed to stock" in text, text


def test_bandwidth_bound_families_extend_above_the_grid_only_when_the_top_two_won():
    """Norms, activations and RoPE keep the kernel above the largest measured point when the two largest points
    both won (a long-context step must not fall onto the stock norms); attention never extends."""
    pts = [(128, 0.8), (1024, 1.3), (8192, 1.5)]
    case = lambda n: {"tokens": n, "head_dim": 128, "grad": True}  # noqa: E731
    t = routing.parse_table(_doc({"rope": bench_routing.family_rules("rope", {"grad": True}, "tokens", pts, "s")}),
                            "x")
    assert [t.decide("rope", case(n))[0] for n in (64, 128, 500, 2000, 8192, 393216)] == \
        ["stock", "stock", "stock", "kernel", "kernel", "kernel"]
    lost_top = bench_routing.family_rules("rope", {"grad": True}, "tokens", [(1024, 1.3), (8192, 0.9)], "s")
    assert routing.parse_table(_doc({"rope": lost_top}), "x").decide("rope", case(65536))[0] == "stock"
    one_point = bench_routing.family_rules("rope", {"grad": True}, "tokens", [(8192, 2.0)], "s")
    assert routing.parse_table(_doc({"rope": one_point}), "x").decide("rope", case(65536))[0] == "stock"
    att = bench_routing.family_rules("attention", {"kind": "dense"}, "kv_len", [(1024, 1.3), (8192, 1.5)], "s")
    assert routing.parse_table(_doc({"attention": att}), "x").decide(
        "attention", _attn(q_len=16384, kv_len=16384))[0] == "stock"


def test_seed_rules_read_rope_json():
    rules, _, env = bench_routing.seed_rules("benchmarks/results/h100")
    t = routing.parse_table(bench_routing.table_doc("h100", bench_routing.provenance("c", env["gpu"], {}, "d"),
                                                    rules), "seed")
    # rope.json: the fused q+k RoPE at 4 x 2048 and 1 x 8192 tokens, Llama-3-8B heads, against torch eager
    assert t.decide("rope", {"tokens": 8192, "head_dim": 128, "grad": True})[0] == "kernel"
    assert t.decide("rope", {"tokens": 128, "head_dim": 128, "grad": True})[0] == "stock"  # not measured


def test_open_range_above_a_measured_grid_stops_at_a_seeded_point():
    """A measured family that extends above its grid must not hide a point the seed measured higher up."""
    measured = {"layer_norm": bench_routing.family_rules("layer_norm", {"grad": True, "hidden": 2048}, "tokens",
                                                         [(1024, 1.3), (8192, 1.5)], "rows")}
    seeded = {"layer_norm": bench_routing.family_rules("layer_norm", {"grad": True, "hidden": 2048}, "tokens",
                                                       [(16384, 0.4), (65536, 1.3)], "seed")}
    t = routing.parse_table(_doc(bench_routing.merge_rules(measured, seeded)), "x")
    case = lambda n: {"tokens": n, "hidden": 2048, "grad": True}  # noqa: E731
    # the seed's 16384 lost: the measured open range is dropped, the seed decides from 8192 up
    assert [t.decide("layer_norm", case(n))[0] for n in (8192, 12000, 16384, 40000, 65536, 10**6)] == \
        ["kernel", "stock", "stock", "stock", "kernel", "stock"]
    # the seed's next point won: the range runs up to it
    seeded_win = {"layer_norm": bench_routing.family_rules("layer_norm", {"grad": True, "hidden": 2048}, "tokens",
                                                           [(16384, 1.4), (65536, 0.8)], "seed")}
    t = routing.parse_table(_doc(bench_routing.merge_rules(measured, seeded_win)), "x")
    assert [t.decide("layer_norm", case(n))[0] for n in (12000, 16384, 40000)] == ["kernel", "kernel", "stock"]


def test_rope_family_times_the_reference_on_the_stock_side(monkeypatch):
    """bench_routing's rope case times what apply_rope routes between: transformers' expression under
    HF_FASTKERN_ROUTING=stock (no kernel launch), the kernel otherwise."""
    from hf_fastkern.kernels import rope as rope_mod
    launches = CallCounter(rope_mod.RopeQKFunction.apply)
    monkeypatch.setattr(rope_mod.RopeQKFunction, "apply", launches)
    fn, leaves = bench_routing._norm_fn("rope", 4, 16, True, "cpu")
    monkeypatch.setenv(routing.MODE_ENV, routing.STOCK)
    fn()
    assert launches.calls == 0
    monkeypatch.setenv(routing.MODE_ENV, routing.KERNEL)
    fn()
    assert launches.calls == 1 and len(leaves) == 2


def test_loop_timing_runs_calls_back_to_back_and_resets_grads():
    """bench_routing times each side with harness.loop_ms: warm-up, one probe call, then loops of n calls (one
    sync per loop), each call after resetting the leaves' .grad; the result is per call."""
    from benchmarks.harness import loop_ms
    x = torch.ones(3, requires_grad=True)
    seen = []

    def fn():
        seen.append(x.grad)
        (x * 2).sum().backward()
    ms = loop_ms(fn, grad_to_none=[x], loops=3, loop_ms_target=0.0, warmup=2)
    assert ms > 0 and len(seen) == 2 + 1 + 3  # n = 1 per loop when the target is 0
    assert all(g is None for g in seen)  # every call started from a reset gradient


def test_rope_call_site_routes_per_case(table, monkeypatch, tmp_path):
    """RoPE follows the table: a table without a rope rule keeps the kernel (as before RoPE was routed); a table
    with rope rules runs the kernel where a rule says so and transformers' expression (bitwise the reference,
    no launch) elsewhere."""
    from hf_fastkern.kernels import rope as rope_mod
    _cuda_like(monkeypatch)
    launches = CallCounter(rope_mod.RopeQKFunction.apply)
    monkeypatch.setattr(rope_mod.RopeQKFunction, "apply", launches)
    q = torch.randn(1, 4, 6, 16, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, 6, 16, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = torch.randn(1, 6, 16, dtype=torch.bfloat16), torch.randn(1, 6, 16, dtype=torch.bfloat16)
    assert "rope" not in table.rules
    rope_mod.apply_rope(q, k, cos, sin)
    assert launches.calls == 1
    rule = {"match": {"tokens": [1, 64], "head_dim": 16}, "choice": "kernel", "ratio": 1.3}
    tmp = tmp_path / "rope.json"
    tmp.write_text(json.dumps(_doc({"rope": [rule]})))
    monkeypatch.setenv(routing.TABLE_ENV, str(tmp))
    routing.reset()
    rope_mod.apply_rope(q, k, cos, sin)
    assert launches.calls == 2
    qq, kk = q.expand(16, -1, -1, -1), k.expand(16, -1, -1, -1)  # 96 tokens: outside the rule
    got = rope_mod.apply_rope(qq, kk, cos, sin)
    want = reference.rope(qq, kk, cos, sin)
    assert launches.calls == 2 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_report_names_rope_routed_to_stock(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_fastkern import apply_fast_kernels, report
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    apply_fast_kernels(model, attention=False, cross_entropy=False)
    assert "apply_rotary_pos_emb: routed" not in str(report(model))
    monkeypatch.setenv(routing.MODE_ENV, routing.STOCK)
    text = str(report(model))
    assert "fallback rope" in text and "its rotation runs apply_rotary_pos_emb: routed to stock" in text, text


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def test_fused_loss_call_site_routes_per_case(table, monkeypatch, tmp_path):
    """The patched causal LM's training loss follows the table (op fused_loss, keyed on the fp32 logits the
    stock loss would make): no rule -> the fused loss (no logits returned, as before routing); a stock rule ->
    the model's own forward with labels (logits returned, the unpatched loss); above the rule -> fused."""
    from hf_fastkern import apply_fast_kernels
    from hf_fastkern.kernels import cross_entropy as ce_mod
    from hf_fastkern.patches import loss as loss_mod
    _cuda_like(monkeypatch)
    calls = CallCounter(ce_mod.fused_linear_cross_entropy)
    monkeypatch.setattr(loss_mod, "fused_linear_cross_entropy", calls)
    model = _tiny_llama()
    ref = _tiny_llama()
    apply_fast_kernels(model, attention=False, norm=False, mlp=False, rope=False)
    model.train()
    ref.train()
    ids = torch.randint(0, 64, (2, 8))
    assert "fused_loss" not in table.rules
    out = model(input_ids=ids, labels=ids)
    assert calls.calls == 1 and out.logits is None
    # 2 x 8 tokens x 64 vocab x 4 bytes = 4 KiB of fp32 logits: 0 MiB; stock there, kernel from 1 MiB up
    rules = [{"match": {"logits_mib": [0, 0], "grad": True}, "choice": "stock", "ratio": 0.8},
             {"match": {"logits_mib": [0, None], "grad": True}, "choice": "kernel"}]
    path = tmp_path / "loss.json"
    path.write_text(json.dumps(_doc({"fused_loss": rules})))
    monkeypatch.setenv(routing.TABLE_ENV, str(path))
    routing.reset()
    out = model(input_ids=ids, labels=ids)
    want = ref(input_ids=ids, labels=ids)
    assert calls.calls == 1 and out.logits is not None
    assert torch.equal(out.loss, want.loss) and torch.equal(out.logits, want.logits)
    rules[0]["match"]["logits_mib"] = [-1, -1]  # nothing is stock any more
    path.write_text(json.dumps(_doc({"fused_loss": rules})))
    routing.reset()
    assert model(input_ids=ids, labels=ids).logits is None and calls.calls == 2


def test_report_names_the_loss_routed_to_stock(monkeypatch):
    from hf_fastkern import apply_fast_kernels, report
    model = _tiny_llama()
    apply_fast_kernels(model, attention=False, norm=False, mlp=False, rope=False)
    assert "routed to stock" not in str(report(model))
    monkeypatch.setenv(routing.MODE_ENV, routing.STOCK)
    text = str(report(model))
    assert "the model's own loss runs: routed to stock" in text, text


def test_fused_loss_rules_keep_the_kernel_above_the_grid():
    """Whatever the top points measured, above the fused loss's grid the kernel runs (the stock loss's logits
    grow without bound); other ops' rules stop at their grid."""
    rules = bench_routing.family_rules("fused_loss", {"grad": True}, "logits_mib", [(16, 0.7), (1000, 0.9)], "s")
    t = routing.parse_table(_doc({"fused_loss": rules}), "x")
    case = lambda m: {"logits_mib": m, "grad": True}  # noqa: E731
    assert [t.decide("fused_loss", case(m))[0] for m in (8, 16, 500, 1000, 1001, 190_000)] == \
        ["stock", "stock", "stock", "stock", "kernel", "kernel"]
    att = bench_routing.family_rules("glu", {"grad": True}, "tokens", [(16, 0.7), (1000, 0.9)], "s")
    assert routing.parse_table(_doc({"glu": att}), "x").decide(
        "glu", {"tokens": 5000, "intermediate": 8, "grad": True})[0] == "stock"


def test_bench_routing_loss_part_cpu_smoke():
    rules, rows = bench_routing.measure(quick=False, smoke=True, log=lambda s: None, parts=("loss",))
    assert {r["op"] for r in rows} == {"fused_loss"} and len(rows) == 4
    assert all(r["stock_ms"] > 0 and r["kernel_ms"] > 0 and "logits_mib" in r for r in rows)
    doc = bench_routing.table_doc("cpu-smoke", bench_routing.provenance("c", "cpu", {}, "d"), rules)
    t = routing.parse_table(doc, "smoke.json")
    assert t.decide("fused_loss", {"logits_mib": 10**5, "grad": True})[0] == "kernel"


def test_ops_routed_late_keep_the_kernel_where_the_table_is_silent(tmp_path, monkeypatch):
    """RoPE and the fused loss joined routing after tables existed: a case whose family (exact keys: head_dim and
    grad for RoPE) has no rule runs the kernel, a GPU class without a table too; a family with rules decides."""
    doc = _doc({"rope": [{"match": {"tokens": [1, 512], "head_dim": 128, "grad": True}, "choice": "stock"}]})
    t = routing.parse_table(doc, "x")
    case = lambda n, d=128, g=True: {"tokens": n, "head_dim": d, "grad": g}  # noqa: E731
    assert t.decide("rope", case(64))[0] == "stock"
    assert t.decide("rope", case(4096))[0] == "stock"  # the family has rules: outside them, stock
    assert t.decide("rope", case(64, d=256))[0] == "kernel"  # head_dim 256: no rule, as before routing
    assert t.decide("rope", case(64, g=False))[0] == "kernel"
    assert t.decide("fused_loss", {"logits_mib": 10, "grad": True})[0] == "kernel"
    assert t.decide("rms_norm", {"tokens": 64, "hidden": 8, "grad": True})[0] == "stock"
    monkeypatch.delenv(routing.TABLE_ENV, raising=False)
    monkeypatch.delenv(routing.MODE_ENV, raising=False)
    routing.reset()
    assert routing.decide("rope", "no-such-gpu", case(64))[0] == "kernel"
    assert routing.decide("fused_loss", "no-such-gpu", {"logits_mib": 1, "grad": True})[0] == "kernel"
    assert routing.decide("rms_norm", "no-such-gpu", {"tokens": 64, "hidden": 8, "grad": True})[0] == "stock"
    monkeypatch.setattr(routing, "gpu_class", lambda device=None: "no-such-gpu")
    text = "\n".join(routing.describe("cuda"))
    assert "except rope, fused_loss" in text


def test_planner_calibration_runs_the_fused_loss(monkeypatch, tmp_path):
    """The checkpoint planner's calibration forwards are small, but they measure the memory of a long step, whose
    loss is fused (above its grid the table always runs the kernel): a table that sends small losses to stock
    must not make them count the stock loss's logits."""
    from hf_fastkern import apply_fast_kernels
    from hf_fastkern.kernels import cross_entropy as ce_mod
    from hf_fastkern.patches import apply as apply_mod
    from hf_fastkern.patches import loss as loss_mod
    _cuda_like(monkeypatch)
    path = tmp_path / "stock_loss.json"
    path.write_text(json.dumps(_doc({"fused_loss": [{"match": {"logits_mib": [0, None]}, "choice": "stock"}]})))
    monkeypatch.setenv(routing.TABLE_ENV, str(path))
    monkeypatch.delenv(routing.MODE_ENV, raising=False)
    routing.reset()
    calls = CallCounter(ce_mod.fused_linear_cross_entropy)
    monkeypatch.setattr(loss_mod, "fused_linear_cross_entropy", calls)
    model = _tiny_llama()
    apply_fast_kernels(model, attention=False, norm=False, mlp=False, rope=False)
    model.train()
    ids = torch.randint(0, 64, (1, 8))
    assert model(input_ids=ids, labels=ids).logits is not None and calls.calls == 0  # routed to stock
    out = apply_mod._calibration_forward(model, 8)
    assert calls.calls == 1 and out.logits is None  # the fused loss, as at the planned length
    assert model(input_ids=ids, labels=ids).logits is not None and calls.calls == 1  # routing again after


def test_loss_grid_points_are_the_call_sites_keys_and_speak_below_the_grid():
    """Each grid point's x is logits_mib as the patched forward computes it, and below the smallest point its
    choice holds (the smallest steps are the most host-bound)."""
    for _, _, sweep, pts in bench_routing.loss_grid(quick=False, smoke=False):
        assert sweep == "logits_mib"
        for x, cases in pts:
            assert all(routing.logits_mib(c["t"], c["v"]) == x for c in cases)
    win = bench_routing.family_rules("fused_loss", {"grad": True}, "logits_mib", [(15, 1.3), (62, 1.2)], "s")
    t = routing.parse_table(_doc({"fused_loss": win}), "x")
    assert [t.decide("fused_loss", {"logits_mib": m, "grad": True})[0] for m in (0, 1, 15, 40, 62, 10**5)] == \
        ["kernel"] * 6
    lose = bench_routing.family_rules("fused_loss", {"grad": True}, "logits_mib", [(15, 0.7), (62, 1.2)], "s")
    t = routing.parse_table(_doc({"fused_loss": lose}), "x")
    assert [t.decide("fused_loss", {"logits_mib": m, "grad": True})[0] for m in (0, 15, 40, 62, 63)] == \
        ["stock", "stock", "stock", "kernel", "kernel"]


def test_report_names_rope_stock_only_for_families_with_rules(monkeypatch, tmp_path):
    """Rope rules for head_dim 128 only (all stock) say nothing about a head_dim-16 model: no reason to report;
    a model of the ruled family is reported routed to stock. The report asks with the module's head_dim."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_fastkern.patches import apply as apply_mod
    rules = [{"match": {"tokens": [1, None], "head_dim": d, "grad": g}, "choice": "stock"}
             for d in (16, 128) for g in (True, False)]
    path = tmp_path / "rope.json"
    path.write_text(json.dumps(_doc({"rope": rules[2:]})))  # head_dim 128 only
    monkeypatch.setenv(routing.TABLE_ENV, str(path))
    monkeypatch.delenv(routing.MODE_ENV, raising=False)
    monkeypatch.setattr(routing, "gpu_class", lambda device=None: "fakegpu")
    routing.reset()
    cuda = torch.device("cuda")  # a device object only: nothing is allocated on it
    assert routing.unrouted_reason("rope", cuda, {"head_dim": 16}) == ""
    assert "head_dim=128" in routing.unrouted_reason("rope", cuda, {"head_dim": 128})
    path.write_text(json.dumps(_doc({"rope": rules})))
    routing.reset()
    assert "head_dim=16" in routing.unrouted_reason("rope", cuda, {"head_dim": 16})
    asked = []
    monkeypatch.setattr(routing, "unrouted_reason", lambda op, dev, family=None: asked.append(family) or "")
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=32)
    apply_mod._rope_status(LlamaForCausalLM(cfg).model.layers[0].self_attn)
    assert asked == [{"head_dim": 16}]
