"""Kernel or stock PyTorch, per op and case, from a table measured on this GPU class (issue 21).

Why: a fused kernel that is slower than PyTorch's own path on some GPU or at some size (head_dim 256 attention,
KV-cache decoding against cuDNN/FlashAttention, a norm at 128 tokens) makes ``apply_fast_kernels`` a slowdown.
So wherever an op may run either our Triton kernel or the stock PyTorch path (what unpatched transformers runs),
the choice is read from ``routing/<gpu_class>.json``, shipped with the package and measured on that GPU class by
``benchmarks/bench_routing.py`` (each table carries the command that produced it, the GPU, versions and date).

Rules:
- A table holds, per op, an ordered list of rules ``{"match": {key: value | [lo, hi]}, "choice": "kernel" |
  "stock", "ratio": stock_ms / kernel_ms, "source": ...}``; the first rule whose every key matches decides
  (a list is an inclusive range, ``null`` an open end; a key the rule does not name matches anything).
- No table for this GPU class, or a case no rule covers (outside the measured grid): **stock**. The table must
  vouch for the kernel; it is never assumed faster.
- Only CUDA tensors are routed. On the CPU (``TRITON_INTERPRET=1``) the kernel path runs as before: that is how
  CI executes every kernel.
- ``HF_FASTKERN_ROUTING=kernel`` / ``stock`` overrides every table (tests pin ``kernel`` so GPU tests exercise
  the kernels); ``HF_FASTKERN_ROUTING_TABLE=/path/table.json`` replaces the shipped table (e.g. the fresh output
  of ``bench_routing.py``).
- A malformed table raises :class:`RoutingTableError` naming the file and the field, at its first use.

Cases (keys a rule may name, per op):
- ``attention``: ``kind`` ("dense", "decode" = fewer queries than keys (KV cache), "padded", "packed"),
  ``head_dim``, ``q_len``, ``kv_len``, ``causal``, ``window`` (bool), ``softcap`` (bool), ``grad`` (bool).
- ``rms_norm``, ``layer_norm``: ``tokens``, ``hidden``, ``grad``.
- ``glu`` (SwiGLU/GeGLU): ``tokens``, ``intermediate``, ``grad``.
- ``gelu`` (the plain GELU of GPT-2 / GPT-NeoX MLPs): ``tokens``, ``features``, ``grad``.
- ``qlora_linear`` (the fused QLoRA linear, :mod:`hf_fastkern.layers.fused_qlora`, vs PEFT's own 4-bit LoRA
  forward): ``tokens``, ``in_features``, ``out_features``, ``grad``.
- ``rope`` (the fused q+k rotary embedding vs transformers' ``apply_rotary_pos_emb``): ``tokens`` (batch x seq),
  ``head_dim``, ``grad``. At a few hundred tokens both are launch-bound and transformers' ~14 small ops can beat
  one Triton launch whose argument binding costs more host time (issue 21). RoPE joined routing after tables
  had been measured without it, so where a table has no rope rule for a case's family (``head_dim``, ``grad``)
  RoPE stays on the kernel, as before routing (:data:`KERNEL_WITHOUT_RULES`); a family with rules decides like
  any other op (no match: stock).
- ``fused_loss`` (a patched causal LM's training loss: the fused linear cross-entropy vs the model's own
  ``lm_head`` + transformers' ``ForCausalLMLoss``): ``logits_mib`` (the fp32 logits the stock loss would
  materialise, tokens x vocab x 4 bytes, in MiB: one number for both its cost and its memory), ``grad``. A small
  step's fused loss costs a label check's host sync and ~30 small ops of host time against stock's ~15; a large
  one saves GiB of logits. No rope-style history, but the same rule: without a rule, the kernel (as before).

Decisions are cached per (GPU class, op, case), so a call pays one dictionary lookup after the first.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from hf_fastkern.kernels.dispatch import clear_per_shape, env_get, raw_env_reader

ROUTING_DIR = Path(__file__).with_name("routing")
SCHEMA = 1
MODE_ENV = "HF_FASTKERN_ROUTING"
TABLE_ENV = "HF_FASTKERN_ROUTING_TABLE"
KERNEL, STOCK = "kernel", "stock"
MODES = ("table", KERNEL, STOCK)

# op -> the case keys a rule may match on (the call sites pass exactly these)
CASE_KEYS: dict[str, tuple[str, ...]] = {
    "attention": ("kind", "head_dim", "q_len", "kv_len", "causal", "window", "softcap", "grad"),
    "rms_norm": ("tokens", "hidden", "grad"),
    "layer_norm": ("tokens", "hidden", "grad"),
    "glu": ("tokens", "intermediate", "grad"),
    "gelu": ("tokens", "features", "grad"),
    "qlora_linear": ("tokens", "in_features", "out_features", "grad"),
    "rope": ("tokens", "head_dim", "grad"),
    "fused_loss": ("logits_mib", "grad"),
}
ATTENTION_KINDS = ("dense", "decode", "padded", "packed")
# ops that joined routing after tables were measured without them: a table holding no rule for a case's family
# (the op's exact keys: head_dim and grad for RoPE) says nothing about it, and a GPU class without a table says
# nothing at all, so the kernel runs there as it did before the op was routed (a family with rules decides)
KERNEL_WITHOUT_RULES = {
    "rope": "the fused RoPE kernel runs wherever it applies, as before RoPE was routed",
    "fused_loss": "the fused linear cross-entropy computes every training loss, as before the loss was routed",
}
PROVENANCE_KEYS = ("command", "gpu", "versions", "date")
_MAX_NARROWED = 1 << 12


class RoutingTableError(ValueError):
    """A routing table that cannot be read: the message names the file and the field."""


@dataclass(frozen=True)
class Rule:
    match: dict[str, Any]
    choice: str
    ratio: float | None = None
    source: str = ""

    def matches(self, case: dict[str, Any]) -> bool:
        for key, want in self.match.items():
            got = case.get(key)
            if isinstance(want, list):
                lo, hi = want
                if got is None or isinstance(got, bool) or (lo is not None and got < lo) \
                        or (hi is not None and got > hi):
                    return False
            elif got != want:
                return False
        return True


@dataclass(frozen=True)
class RoutingTable:
    gpu_class: str
    path: str
    provenance: dict[str, Any]
    rules: dict[str, tuple[Rule, ...]] = field(default_factory=dict)
    # op -> its exact-match keys; (op, their values in a case) -> the rules that can match, in table order
    _narrowed: dict[tuple, tuple[Rule, ...]] = field(default_factory=dict, init=False, compare=False, repr=False)

    def _candidates(self, op: str, case: dict[str, Any]) -> tuple[Rule, ...]:
        """The op's rules, narrowed to those whose exact-match keys (never a range in any of the op's rules:
        kind, head_dim, grad ...) agree with ``case``, order kept, so the first match is the same rule. A
        decoding step has a new ``kv_len`` each token, a cache miss in ``use_kernel``: this keeps the scan to
        the case's family (a few rules) rather than the whole table."""
        if not self.rules.get(op):
            return ()
        exact_keys = self._narrowed.get(op)
        if exact_keys is None:
            ranged = {k for r in self.rules.get(op, ()) for k, v in r.match.items() if isinstance(v, list)}
            exact_keys = self._narrowed[op] = tuple(k for k in CASE_KEYS.get(op, ()) if k not in ranged)
        sig = (op, *[case.get(k) for k in exact_keys])
        hit = self._narrowed.get(sig)
        if hit is None:
            exact = dict(zip(exact_keys, sig[1:]))
            hit = tuple(r for r in self.rules.get(op, ())
                        if all(k not in exact or exact[k] == v for k, v in r.match.items()))
            if len(self._narrowed) >= _MAX_NARROWED:  # bounded like the decision cache (an exact key may vary)
                self._narrowed.clear()
            self._narrowed[sig] = hit
        return hit

    def decide(self, op: str, case: dict[str, Any]) -> tuple[str, str]:
        """(choice, why) for ``op`` at ``case``: the first matching rule, else stock (see
        :data:`KERNEL_WITHOUT_RULES` for an op the table has no rule for)."""
        candidates = self._candidates(op, case)
        if op in KERNEL_WITHOUT_RULES and not candidates:
            # no rule of this case's family (head_dim, grad ...): the table says nothing about it
            name = os.path.basename(self.path)
            return KERNEL, f"{name} has no {op} rule for this case's family: {KERNEL_WITHOUT_RULES[op]}"
        for rule in candidates:
            if rule.matches(case):
                ratio = f", stock/kernel time {rule.ratio:.2f}" if rule.ratio is not None else ""
                return rule.choice, f"{os.path.basename(self.path)}: {rule.source or 'rule'}{ratio}"
        return STOCK, f"outside the grid measured in {os.path.basename(self.path)}"


# ----------------------------------------------------------------------------------------------------------
# reading and checking a table


def _fail(path: str, what: str) -> RoutingTableError:
    return RoutingTableError(f"routing table {path}: {what}")


def _check_match(path: str, where: str, op: str, match: Any) -> dict[str, Any]:
    if not isinstance(match, dict):
        raise _fail(path, f"{where}.match must be an object of case keys, got {type(match).__name__}")
    out = {}
    for key, want in match.items():
        if key not in CASE_KEYS[op]:
            raise _fail(path, f"{where}.match has key {key!r}; {op} cases have {', '.join(CASE_KEYS[op])}")
        if isinstance(want, list):
            if len(want) != 2 or not all(v is None or (isinstance(v, int | float) and not isinstance(v, bool))
                                         for v in want):
                raise _fail(path, f"{where}.match.{key} must be [lo, hi] numbers or null, got {want!r}")
        elif not isinstance(want, bool | int | float | str):
            raise _fail(path, f"{where}.match.{key} must be a value or a [lo, hi] range, got {want!r}")
        out[key] = want
    return out


def parse_table(doc: Any, path: str) -> RoutingTable:
    """Check a table document (see the module docstring) and build it; :class:`RoutingTableError` if malformed."""
    if not isinstance(doc, dict):
        raise _fail(path, f"must be a JSON object, got {type(doc).__name__}")
    if doc.get("schema") != SCHEMA:
        raise _fail(path, f"schema must be {SCHEMA}, got {doc.get('schema')!r}")
    gpu_class = doc.get("gpu_class")
    if not isinstance(gpu_class, str) or not gpu_class:
        raise _fail(path, "gpu_class must be a non-empty string")
    prov = doc.get("provenance")
    if not isinstance(prov, dict) or any(k not in prov for k in PROVENANCE_KEYS):
        raise _fail(path, f"provenance must be an object with {', '.join(PROVENANCE_KEYS)}")
    ops = doc.get("ops")
    if not isinstance(ops, dict):
        raise _fail(path, "ops must be an object {op: [rules]}")
    rules: dict[str, tuple[Rule, ...]] = {}
    for op, lst in ops.items():
        if op not in CASE_KEYS:
            raise _fail(path, f"unknown op {op!r} (known: {', '.join(CASE_KEYS)})")
        if not isinstance(lst, list):
            raise _fail(path, f"ops.{op} must be a list of rules")
        out = []
        for i, r in enumerate(lst):
            where = f"ops.{op}[{i}]"
            if not isinstance(r, dict):
                raise _fail(path, f"{where} must be an object")
            if r.get("choice") not in (KERNEL, STOCK):
                raise _fail(path, f"{where}.choice must be 'kernel' or 'stock', got {r.get('choice')!r}")
            ratio = r.get("ratio")
            if ratio is not None and (not isinstance(ratio, int | float) or isinstance(ratio, bool)):
                raise _fail(path, f"{where}.ratio must be a number or null, got {ratio!r}")
            out.append(Rule(_check_match(path, where, op, r.get("match", {})), r["choice"],
                            None if ratio is None else float(ratio), str(r.get("source", ""))))
        rules[op] = tuple(out)
    return RoutingTable(gpu_class, path, prov, rules)


def read_table(path: str | os.PathLike) -> RoutingTable:
    path = str(path)
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise _fail(path, f"is not valid JSON ({e})") from e
    return parse_table(doc, path)


def gpu_class_of_name(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA A100-SXM4-80GB" -> "a100", else a slug of the whole name."""
    words = re.split(r"[^a-z0-9]+", name.lower())
    for w in words:
        if w != "nvidia" and re.fullmatch(r"[a-z]+\d+[a-z]*", w) and not re.fullmatch(r"\d+gb|hbm\d*|sxm\d*", w):
            return w
    return "-".join(w for w in words if w)


# ----------------------------------------------------------------------------------------------------------
# case keys the call sites compute


def logits_mib(tokens: int, vocab: int) -> int:
    """The ``fused_loss`` case key: the fp32 logits the stock loss would make (tokens x vocab x 4 bytes), in MiB."""
    return (tokens * vocab * 4) >> 20


def leading_rows(x: torch.Tensor) -> int:
    """Product of the leading dimensions (works on fake tensors' symbolic shapes, and for hidden == 0)."""
    return math.prod(x.shape[:-1])  # not Size.numel(): outside dynamo (fake kernels) it specializes symbolic sizes


def forward_ad_active() -> bool:
    """Is a ``torch.autograd.forward_ad.dual_level`` open? Dual tensors have ``requires_grad=False``, so a path
    that skips the autograd.Function when :func:`records_grad` is False must not skip it then (the Function
    raises for a missing jvp; a bare launcher would drop the tangent). Unknown (private attribute gone): True."""
    return getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0


def records_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Will autograd record this call (the routing table keeps forward-only and training cases apart)?"""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# (device index) -> class; (class, env path) -> table or None. Filled lazily, never at import.
_CLASS: dict[int, str] = {}
_TABLES: dict[tuple[str, str | None], RoutingTable | None] = {}
_DECISIONS: dict[tuple, bool] = {}
# the two switches, read raw on every call (a decoding step routes ~5 ops per layer): one C call each
_MODE_RAW, _TABLE_RAW = raw_env_reader(MODE_ENV), raw_env_reader(TABLE_ENV)
_MAX_DECISIONS = 1 << 14


def gpu_class(device: torch.device | str | int | None = None) -> str | None:
    """The routing class of a CUDA device (None when CUDA is absent or ``device`` is not CUDA)."""
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda")
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CLASS:
        _CLASS[idx] = gpu_class_of_name(torch.cuda.get_device_name(idx))
    return _CLASS[idx]


def table_path(cls: str) -> tuple[str, bool]:
    """(path, from_env) of the table for GPU class ``cls``."""
    env = env_get(TABLE_ENV)
    if env:
        return env, True
    return str(ROUTING_DIR / f"{cls}.json"), False


def load_table(cls: str) -> RoutingTable | None:
    """The table for GPU class ``cls`` (None when the package ships none); ``HF_FASTKERN_ROUTING_TABLE`` wins."""
    env = env_get(TABLE_ENV)
    key = (cls, env)
    if key not in _TABLES:
        path, from_env = table_path(cls)
        if not from_env and not os.path.exists(path):
            _TABLES[key] = None
        else:
            _TABLES[key] = read_table(path)
    return _TABLES[key]


def reset() -> None:
    """Forget loaded tables and cached decisions, the entry points' per-signature ones included (tests; after
    replacing a table file)."""
    _TABLES.clear()
    _DECISIONS.clear()
    clear_per_shape()


def mode() -> str:
    m = env_get(MODE_ENV, "table")
    if m not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {', '.join(MODES)}, got {m!r}")
    return m


def decide(op: str, cls: str | None, case: dict[str, Any]) -> tuple[str, str]:
    """(choice, why) for ``op`` at ``case`` on GPU class ``cls`` (None: not a CUDA device -> kernel)."""
    if op not in CASE_KEYS:
        raise ValueError(f"op must be one of {', '.join(CASE_KEYS)}, got {op!r}")
    m = mode()
    if m != "table":
        return m, f"{MODE_ENV}={m}"
    if cls is None:
        return KERNEL, "not a CUDA device (the CPU interpreter runs the kernels)"
    table = load_table(cls)
    if table is None:
        if op in KERNEL_WITHOUT_RULES:
            return KERNEL, f"no routing table for GPU class {cls!r}: {KERNEL_WITHOUT_RULES[op]}"
        return STOCK, f"no routing table for GPU class {cls!r} (measure one with benchmarks/bench_routing.py)"
    return table.decide(op, case)


def use_kernel(op: str, device: torch.device, **case: Any) -> bool:
    """True when ``op`` should run our kernel at ``case`` on ``device``, False for the stock PyTorch path.

    ``case`` holds the op's keys (:data:`CASE_KEYS`), always passed in the same order by a call site: the
    decision is cached on the values."""
    if device.type != "cuda":
        m = mode()
        return m != STOCK
    if _MODE_RAW() is not None:  # set (tests pin "kernel"): read it properly
        m = env_get(MODE_ENV)
        if m == KERNEL:
            return True
        if m == STOCK:
            return False
    key = (op, device.index, _TABLE_RAW(), *case.values())
    hit = _DECISIONS.get(key)
    if hit is not None:
        return hit
    ok = decide(op, gpu_class(device), case)[0] == KERNEL
    if len(_DECISIONS) >= _MAX_DECISIONS:
        _DECISIONS.clear()
    _DECISIONS[key] = ok
    return ok


def unrouted_reason(op: str, device: torch.device, family: dict[str, Any] | None = None) -> str:
    """Why ``op`` cannot take the kernel anywhere on ``device`` ("" when some case may): for the patch report,
    which has no call's case at hand. A CUDA device whose table (if any) holds no ``kernel`` rule for ``op``
    routes every case to stock. ``family``: what the caller knows of its cases (RoPE's ``head_dim``): for ops
    routed late, a family without rules (for either ``grad``) keeps the kernel."""
    if device.type != "cuda":
        return "HF_FASTKERN_ROUTING=stock" if mode() == STOCK else ""
    m = mode()
    if m != "table":
        return "" if m == KERNEL else f"{MODE_ENV}={m}"
    cls = gpu_class(device)
    table = load_table(cls)
    if op in KERNEL_WITHOUT_RULES and (table is None or not table.rules.get(op)):
        return ""
    if table is None:
        return f"no routing table for GPU class {cls!r}"
    if op in KERNEL_WITHOUT_RULES and family is not None:
        for grad in (True, False):
            cands = table._candidates(op, {**family, "grad": grad})
            if not cands or any(r.choice == KERNEL for r in cands):
                return ""
        return (f"no {op} case of {_fmt_match(family)} measured faster in {os.path.basename(table.path)} "
                "(benchmarks/bench_routing.py)")
    if not any(r.choice == KERNEL for r in table.rules.get(op, ())):
        also = " (families it has no rule for keep the kernel)" if op in KERNEL_WITHOUT_RULES else ""
        return (f"no {op} case measured faster in {os.path.basename(table.path)} (benchmarks/bench_routing.py)"
                f"{also}")
    return ""


# ----------------------------------------------------------------------------------------------------------
# `hf-fastkern info`


def _fmt_match(match: dict[str, Any]) -> str:
    parts = []
    for k, v in match.items():
        if isinstance(v, list):
            lo, hi = v
            parts.append(f"{k} {'' if lo is None else lo}..{'' if hi is None else hi}")
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts) or "any"


def describe(device: torch.device | str | None = None) -> list[str]:
    """The routing in force for ``device`` (default: this machine's GPU), one line each."""
    try:
        m = mode()
    except ValueError as e:
        return [str(e)]
    if m != "table":
        return [f"{MODE_ENV}={m}: every routed op runs the {m} path"]
    cls = gpu_class(device)
    if cls is None:
        return ["no CUDA device: routing does not apply (kernels run wherever Triton runs)"]
    try:
        table = load_table(cls)
    except RoutingTableError as e:
        return [str(e)]
    if table is None:
        path, _ = table_path(cls)
        return [f"GPU class {cls}: no routing table ({path} is absent), every routed op runs the stock path except "
                f"{', '.join(KERNEL_WITHOUT_RULES)} (the kernel, as before they were routed)",
                "  measure one: python benchmarks/bench_routing.py --out table.json, then set "
                f"{TABLE_ENV}=table.json"]
    p = table.provenance
    lines = [f"GPU class {cls}: {table.path}",
             f"  measured on {p.get('gpu')} {p.get('date')}: {p.get('command')}",
             f"  versions: {', '.join(f'{k} {v}' for k, v in (p.get('versions') or {}).items())}"]
    if p.get("note"):
        lines.append(f"  note: {p['note']}")
    for op, why in KERNEL_WITHOUT_RULES.items():
        if not table.rules.get(op):
            lines.append(f"  {op}: no rule: {why}")
    for op, rules in table.rules.items():
        if not rules:
            if op not in KERNEL_WITHOUT_RULES:
                lines.append(f"  {op}: no rule: every case runs the stock path")
            continue
        late = " (a case family without rules -> kernel)" if op in KERNEL_WITHOUT_RULES else ""
        lines.append(f"  {op}: {len(rules)} rule(s), first match wins, no match -> stock{late}")
        for r in rules:
            ratio = "" if r.ratio is None else f"  stock/kernel {r.ratio:.2f}"
            lines.append(f"    {r.choice:<6} {_fmt_match(r.match)}{ratio}")
    return lines


def print_routing(device: torch.device | str | None = None) -> None:
    """Print :func:`describe` under a heading (the one call ``hf-fastkern info`` makes)."""
    print("routing (kernel vs stock PyTorch, hf_fastkern/kernels/routing.py)")
    for line in describe(device):
        print(f"  {line}")
