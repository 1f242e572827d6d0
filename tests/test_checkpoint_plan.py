"""Memory-budgeted checkpointing (hf_fastkern.memory.checkpoint_plan, ``apply_fast_kernels(checkpoint=...)``).

The planner's decisions against a fake memory model (pure, no model); then on a tiny 4-layer Llama: every mode and
mixed plans against transformers' own full recompute (loss and every parameter gradient, bitwise: the modes run
the same ops, only where their inputs are kept differs), with and without a PEFT LoRA adapter; the plan enforced
under Trainer's ``gradient_checkpointing=True``; re-planning for larger steps; the measured costs; revert.
"""
from __future__ import annotations

import math

import peft
import pytest
import torch

from hf_fastkern import apply_fast_kernels, report, revert_fast_kernels
from hf_fastkern.layers.fused_mlp import STORE_ACTIVATION
from hf_fastkern.memory.checkpoint_plan import (
    GIB,
    MODES,
    LayerCost,
    MemoryModel,
    analytic_layer_cost,
    checkpoint_planner,
    estimate_peak,
    measure_memory_model,
    plan_checkpointing,
)
from tests.test_patch_archs import Arch, _llama_like, batch, build

LLAMA4 = Arch("llama", "LlamaForCausalLM", "LlamaConfig", _llama_like(layers=4), 2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def reference(monkeypatch):
    monkeypatch.setenv("HF_FASTKERN_FORCE_REFERENCE", "1")


# ----------------------------------------------------------------------------------------------------------
# the planner, against a fake memory model

COST = LayerCost(keep=100.0, cheap=60.0, full=10.0, offload=0.0)
FAKE = MemoryModel((COST,) * 4, fixed_bytes=1000.0, per_token_bytes=0.0, source="fake")


def test_estimate_peak_counts_the_recompute_above_the_layers_below():
    # all keep: the end of the forward
    assert estimate_peak(FAKE, ["keep"] * 4, 10) == 1000 + 10 * 400
    # layer 0 checkpointed: its backward holds its input and its recompute (cheap level) with nothing below
    assert estimate_peak(FAKE, ["full", "keep", "keep", "keep"], 10) == 1000 + 10 * 310
    # the last layer checkpointed instead: its recompute sits on top of the three layers below
    assert estimate_peak(FAKE, ["keep", "keep", "keep", "full"], 10) == 1000 + 10 * (300 + 10 + 60)
    assert estimate_peak(FAKE, ["offload"] * 4, 10) == 1000 + 10 * 70


@pytest.mark.parametrize("budget,modes", [
    (5000, ("keep",) * 4),                                # everything fits: no recompute
    (4700, ("cheap", "keep", "keep", "keep")),            # one layer's cheap parts are enough
    (3000, ("full", "cheap", "cheap", "cheap")),          # all cheap is not: whole layers, from the first
    (2200, ("full", "full", "full", "cheap")),            # the top layer stays: its recompute would raise the peak
    (1850, ("offload", "full", "full", "cheap")),         # offload, from the first
    (1750, ("offload", "offload", "full", "cheap")),
], ids=["fits", "cheap", "full_1", "full_3", "offload_1", "offload_2"])
def test_plan_decisions(budget, modes):
    plan = plan_checkpointing(FAKE, budget, 10)
    assert plan.modes == modes, plan.describe()
    assert plan.fits and plan.peak_bytes <= budget
    assert plan.peak_bytes == estimate_peak(FAKE, modes, 10)
    assert plan.source == "fake" and plan.tokens == 10


def test_plan_that_cannot_fit_offloads_everything_and_says_so():
    plan = plan_checkpointing(FAKE, 1500, 10)
    assert plan.modes == ("offload", "offload", "full", "cheap") and not plan.fits
    assert plan.peak_bytes == 1700
    # nothing lower is reachable: offloading or checkpointing the rest raises the estimate
    for modes in (("offload",) * 4, ("offload", "offload", "offload", "cheap"), ("full",) * 4):
        assert estimate_peak(FAKE, modes, 10) >= plan.peak_bytes
    assert "does NOT fit" in plan.describe()


def test_cheap_that_saves_nothing_is_skipped():
    # no lean MLP: cheap keeps what keep keeps, so the planner goes straight to whole layers
    flat = MemoryModel((LayerCost(keep=100.0, cheap=100.0, full=10.0),) * 4, 1000.0, source="fake")
    assert plan_checkpointing(flat, 4500, 10).modes == ("full", "keep", "keep", "keep")


def test_checkpointing_the_top_layer_alone_is_never_chosen():
    one = MemoryModel((COST,), 0.0, source="fake")
    assert estimate_peak(one, ["full"], 10) > estimate_peak(one, ["cheap"], 10)
    assert plan_checkpointing(one, 1.0, 10).modes == ("cheap",)


def test_smaller_budgets_never_recompute_less():
    order = {m: i for i, m in enumerate(MODES)}
    last = None
    for budget in range(5200, 1500, -50):
        plan = plan_checkpointing(FAKE, budget, 10)
        assert plan.fits == (plan.peak_bytes <= budget)
        if plan.fits:
            assert plan.peak_bytes <= budget
        if last is not None:
            assert all(order[a] >= order[b] for a, b in zip(plan.modes, last)), (budget, plan.modes, last)
        last = plan.modes


def test_backward_workspace_sits_on_top_of_the_layers_below():
    w = LayerCost(keep=100.0, cheap=60.0, full=10.0, workspace=30.0)
    mm = MemoryModel((w,) * 4, 0.0, source="fake")
    # the top layer's backward: every layer still holds its activations, plus the top layer's temporaries
    assert estimate_peak(mm, ["keep"] * 4, 1) == 400 + 30
    # checkpointed first layer: nothing below it, its input + recompute + temporaries (10 + 60 + 30) < the top's
    assert estimate_peak(mm, ["full", "keep", "keep", "keep"], 1) == 10 + 300 + 30
    assert plan_checkpointing(mm, 420, 1).modes == ("cheap", "keep", "keep", "keep")


def test_per_token_and_fixed_bytes_count():
    mm = MemoryModel((COST,) * 2, fixed_bytes=50.0, per_token_bytes=7.0, source="fake")
    assert estimate_peak(mm, ["keep", "keep"], 3) == 50 + 3 * (7 + 200)


@pytest.mark.parametrize("budget", [0, -1.0, float("nan"), float("inf"), True, "1"], ids=str)
def test_plan_rejects_bad_budget(budget):
    with pytest.raises(ValueError, match="budget_bytes"):
        plan_checkpointing(FAKE, budget, 10)


@pytest.mark.parametrize("tokens", [0, -3, 2.5, True], ids=str)
def test_plan_rejects_bad_tokens(tokens):
    with pytest.raises(ValueError, match="tokens"):
        plan_checkpointing(FAKE, 1e9, tokens)


def test_estimate_rejects_a_wrong_number_of_modes():
    with pytest.raises(ValueError, match="3 entries for 4 layers"):
        estimate_peak(FAKE, ["keep"] * 3, 10)


def test_analytic_cost_of_a_lean_mlp():
    cfg = build(LLAMA4).config  # hidden 64, 4 heads / 2 KV heads of 16, intermediate 128
    c = analytic_layer_cost(cfg, 2, lean_mlp=True)
    assert c.keep - c.cheap == 2 * 128 and c.full == 2 * 64 and c.offload == 0
    assert c.workspace == 2 * 3 * 128  # the MLP backward's dh, dg, du outweigh attention's dO, dq, dk, dv
    assert analytic_layer_cost(cfg, 2, lean_mlp=False).cheap == c.keep


# ----------------------------------------------------------------------------------------------------------
# bad options


@pytest.mark.parametrize("kw,match", [
    (dict(checkpoint="sometimes"), "checkpoint must be"),
    (dict(checkpoint="auto", memory_budget_gib=-1.0), "positive finite"),
    (dict(checkpoint="auto", memory_budget_gib=0), "positive finite"),
    (dict(checkpoint="auto", memory_budget_gib=float("nan")), "positive finite"),
    (dict(checkpoint="auto", memory_budget_gib=True), "positive finite"),
    (dict(memory_budget_gib=10.0), "budget of checkpoint='auto'"),
    (dict(checkpoint="full", memory_budget_gib=10.0), "budget of checkpoint='auto'"),
    (dict(checkpoint="auto", memory_budget_gib=1.0, offload_activations=True), "offload_activations"),
    (dict(checkpoint="auto", memory_budget_gib=1.0, memory_model="fake"), "MemoryModel"),
    (dict(checkpoint="auto", memory_budget_gib=1.0, memory_model=MemoryModel((COST,) * 3, 0.0)), "3 layers"),
], ids=lambda v: str(v)[:40])
def test_bad_options_raise(kw, match):
    model = build(LLAMA4)
    with pytest.raises(ValueError, match=match):
        apply_fast_kernels(model, **kw)


def test_auto_without_budget_and_without_cuda_raises(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="pass memory_budget_gib"):
        apply_fast_kernels(build(LLAMA4), checkpoint="auto")


def test_default_options_change_nothing_about_checkpointing():
    model = build(LLAMA4)
    before = [dict(m._forward_pre_hooks) for m in (model, model.model)]
    rep = apply_fast_kernels(model)
    assert "checkpoint" not in rep.patched and not rep.chosen
    assert checkpoint_planner(model) is None and checkpoint_planner(model.model) is None
    assert len(model.model._forward_pre_hooks) == len(before[1])


# ----------------------------------------------------------------------------------------------------------
# on a model: every mode against transformers' full recompute


def _lora(model):
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights="gaussian")
    model = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # PEFT starts lora_B at zero: give it values so every adapter gradient is exercised
        for i, (n, p) in enumerate(model.named_parameters()):
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return model


def _model(lora: bool):
    model = build(LLAMA4)  # seeded: the same weights every time
    return (_lora(model) if lora else model).train()


def _step(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _mlp_calls(model):
    """Calls of each layer's MLP: twice per step in a checkpointed layer (forward, recompute). Counted by a
    pre-hook: the non-reentrant recompute stops early, once the last tensor it needs exists, so the MLP's forward
    hooks never see the recompute finish."""
    counts = []
    for layer in model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers:
        counts.append([0])
        layer.mlp.register_forward_pre_hook(lambda m, a, c=counts[-1]: c.__setitem__(0, c[0] + 1))
    return counts


# budgets (bytes, for 2 x 16 tokens) that give mixed plans with the fake costs above
MIXED = {"auto_full_cheap": (5000, ("full", "full", "cheap", "cheap")),
         "auto_offload_full_cheap": (2700, ("offload", "full", "full", "cheap"))}


@pytest.mark.parametrize("lora", [False, True], ids=["full_ft", "lora"])
@pytest.mark.parametrize("mode", [*MODES, *MIXED])
def test_every_mode_equals_full_recompute(reference, mode, lora):
    ids, labels = batch()
    want_model = _model(lora)
    apply_fast_kernels(want_model)
    want_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    want = _step(want_model, ids, labels)

    model = _model(lora)
    if mode in MIXED:
        budget, modes = MIXED[mode]
        fake = MemoryModel((COST,) * 4, 0.0, source="fake")
        rep = apply_fast_kernels(model, checkpoint="auto", memory_budget_gib=budget / GIB, memory_model=fake)
    else:
        modes = (mode,) * 4
        rep = apply_fast_kernels(model, checkpoint=mode)
    assert rep.patched.get("checkpoint") == 1, str(rep)
    calls = _mlp_calls(model)
    got = _step(model, ids, labels)
    assert [c[0] for c in calls] == [2 if m in ("full", "offload") else 1 for m in modes]
    planner = checkpoint_planner(model.get_base_model() if lora else model)
    assert planner.offloader.stats.packed == modes.count("offload")  # the offloaded layers' inputs, nothing else
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    assert got[1].keys() == want[1].keys()
    for n in want[1]:
        assert torch.equal(got[1][n], want[1][n]), f"gradient of {n} differs in mode {mode}"


def test_keep_stores_the_mlp_activation_and_cheap_does_not():
    """Measured saved bytes (the Triton activation, in the interpreter here): keep - cheap is the one
    [tokens, intermediate] h per layer that the lean MLP recomputes, full is the layer input."""
    model = _model(False)
    apply_fast_kernels(model, checkpoint="auto", memory_budget_gib=1.0)
    planner = checkpoint_planner(model)

    def run(n):
        ids = torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(n))
        return model(input_ids=ids, labels=ids)

    measured = measure_memory_model(planner, model, run, (16, 32))
    assert measured.source == "measured" and len(measured.layers) == 4
    for c in measured.layers:
        assert c.keep - c.cheap == 128 * 4  # fp32 h
        assert c.full == 64 * 4 and c.offload == 0
    analytic = planner.analytic()
    for a, m in zip(analytic.layers, measured.layers):
        # the config estimate is close, not exact (RoPE's cos/sin are counted in the first layer that saves them)
        assert math.isclose(a.keep, m.keep, rel_tol=0.1), (a, m)
    assert planner.forced is None
    assert all(STORE_ACTIVATION not in layer.mlp.__dict__ for layer in model.model.layers)


def test_auto_measures_once_when_asked_and_plans_with_it(reference):
    model = _model(False)
    apply_fast_kernels(model, checkpoint="auto", memory_budget_gib=1.0)
    planner = checkpoint_planner(model)
    planner.calibrate_off_cuda = True  # on CUDA this is the default
    ids, labels = batch()
    rng = torch.get_rng_state()
    model(input_ids=ids, labels=labels).loss.backward()
    assert torch.equal(torch.get_rng_state(), rng), "the calibration forwards moved the RNG"
    assert planner.measured is not None and planner.plan.source == "measured"
    assert planner.plan.modes == ("keep",) * 4  # 1 GiB holds everything at this size
    assert "chose" in str(report(model)) and "keep x4" in str(report(model))


def test_plan_is_remade_when_steps_grow(reference):
    model = _model(False)
    fake = MemoryModel((COST,) * 4, 0.0, source="fake")
    apply_fast_kernels(model, checkpoint="auto", memory_budget_gib=5000 / GIB, memory_model=fake)
    planner = checkpoint_planner(model)
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    assert planner.plan.tokens == 32 and planner.plan.modes == MIXED["auto_full_cheap"][1]
    ids2, labels2 = batch(bsz=4)
    model(input_ids=ids2, labels=labels2).loss.backward()
    assert planner.plans_made == 2 and planner.plan.tokens == 64
    assert planner.plan.modes == ("offload", "offload", "full", "cheap")  # twice the tokens, the same budget
    model(input_ids=ids, labels=labels).loss.backward()  # a smaller step fits the plan made for the larger
    assert planner.plans_made == 2


def test_a_step_over_the_budget_corrects_the_estimate_and_replans(reference):
    """The real peak of a step (CUDA: max_memory_allocated; injected here) above the estimate and the budget:
    the difference joins the fixed bytes and the next step runs a new plan."""
    model = _model(False)
    fake = MemoryModel((COST,) * 4, 0.0, source="fake")
    apply_fast_kernels(model, checkpoint="auto", memory_budget_gib=5000 / GIB, memory_model=fake)
    planner = checkpoint_planner(model)
    running_max = [100]
    planner.peak_reader = lambda: running_max[0]
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    assert planner.plan.modes == ("full", "full", "cheap", "cheap") and planner.plan.peak_bytes == 4480
    running_max[0] = 6000  # the step really peaked at 6000 bytes
    with pytest.warns(UserWarning, match="over the .* budget"):
        model(input_ids=ids, labels=labels).loss.backward()
    assert planner.correction == 6000 - 4480
    assert planner.plan.modes == ("full", "full", "full", "cheap") and planner.plan.peak_bytes == 1520 + 2880
    assert "from a measured step" in planner.describe()
    # the running maximum did not rise: nothing learned, the plan stays
    model(input_ids=ids, labels=labels).loss.backward()
    assert planner.correction == 1520 and planner.plans_made == 2 and planner.checks_left == 0


def test_a_running_maximum_above_the_estimate_is_reset_so_the_step_peak_shows(reference):
    """An earlier, larger step left the running maximum above the plan's estimate: the watch resets it (CUDA's
    reset_peak_memory_stats; injected here), so the step's own peak, over the budget, is seen and corrected."""
    model = _model(False)
    fake = MemoryModel((COST,) * 4, 0.0, source="fake")
    apply_fast_kernels(model, checkpoint="auto", memory_budget_gib=5000 / GIB, memory_model=fake)
    planner = checkpoint_planner(model)
    state = {"max": 9000, "now": 100, "resets": 0}  # 9000: a step before the planner ran (all keep, say)

    def reset():
        state["resets"] += 1
        state["max"] = state["now"]
    planner.peak_reader, planner.peak_reset = (lambda: state["max"]), reset
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    assert state["resets"] == 1 and planner.plan.peak_bytes == 4480
    state["max"] = 6000  # this step's own peak, over the 5000 budget
    with pytest.warns(UserWarning, match="over the .* budget"):
        model(input_ids=ids, labels=labels).loss.backward()
    assert planner.correction == 6000 - 4480 and planner.plans_made == 2
    assert state["resets"] == 2  # the running max (6000) was above the new plan's estimate (4400) again


def test_a_step_under_the_estimate_changes_nothing(reference):
    model = _model(False)
    fake = MemoryModel((COST,) * 4, 0.0, source="fake")
    apply_fast_kernels(model, checkpoint="auto", memory_budget_gib=5000 / GIB, memory_model=fake)
    planner = checkpoint_planner(model)
    reads = iter([100, 4000, 4000, 4000, 4100])  # per step: checked at its start, watched from its stack call
    planner.peak_reader = lambda: next(reads)
    ids, labels = batch()
    for _ in range(3):
        model(input_ids=ids, labels=labels).loss.backward()
    assert planner.correction == 0 and planner.plans_made == 1


def test_model_flags_only_change_during_a_training_forward(reference):
    model = _model(False)
    model.gradient_checkpointing_enable()
    apply_fast_kernels(model, checkpoint="keep")
    seen = []
    model.model.layers[1].register_forward_pre_hook(
        lambda m, a: seen.append((m.gradient_checkpointing, STORE_ACTIVATION in m.mlp.__dict__)))
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    with torch.no_grad():
        model(input_ids=ids)
    model.eval()
    model(input_ids=ids)
    assert seen == [(False, True), (True, False), (True, False)]
    assert all(layer.gradient_checkpointing for layer in model.model.layers)


def test_trainer_gradient_checkpointing_runs_the_plan(reference, tmp_path):
    """Trainer's gradient_checkpointing=True (enabled at train start, after the patch) does not override the plan;
    the loss curve is the one of Trainer's full recompute."""
    from tests.test_trainer import STEPS, train

    base = _model(False)
    apply_fast_kernels(base)
    want = train(base, tmp_path / "base", gc=True)
    model = _model(False)
    fake = MemoryModel((COST,) * 4, 0.0, source="fake")
    apply_fast_kernels(model, checkpoint="auto", memory_budget_gib=5000 / GIB, memory_model=fake)
    calls = _mlp_calls(model)
    got = train(model, tmp_path / "auto", gc=True)
    assert all(layer.gradient_checkpointing for layer in model.model.layers), "Trainer did not enable checkpointing"
    planner = checkpoint_planner(model)
    assert planner.plan.modes == ("full", "full", "cheap", "cheap"), planner.describe()
    assert [c[0] for c in calls] == [2 * STEPS, 2 * STEPS, STEPS, STEPS]
    assert torch.equal(got, want), (got.tolist(), want.tolist())


def test_revert_removes_the_planner(reference):
    model = _model(False)
    model.gradient_checkpointing_enable()
    hooks = [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in (model, model.model)]
    rep = apply_fast_kernels(model, checkpoint="auto", memory_budget_gib=1.0)
    assert rep.chosen and rep.chosen[0][0] == "checkpoint" and "first training forward" in rep.chosen[0][1]
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    assert revert_fast_kernels(model) > 0
    assert checkpoint_planner(model) is None and checkpoint_planner(model.model) is None
    assert [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in (model, model.model)] == hooks
    for layer in model.model.layers:
        assert layer.gradient_checkpointing is True and STORE_ACTIVATION not in layer.mlp.__dict__
    calls = _mlp_calls(model)
    model(input_ids=ids, labels=labels).loss.backward()
    assert [c[0] for c in calls] == [2] * 4  # the model's own checkpointing again


def test_second_apply_changes_the_mode(reference):
    model = _model(False)
    apply_fast_kernels(model, checkpoint="full")
    rep = apply_fast_kernels(model, checkpoint="keep")
    assert rep.already.get("checkpoint") == 1 and "every layer keep" in str(rep)
    calls = _mlp_calls(model)
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    assert [c[0] for c in calls] == [1] * 4


def test_deepcopy_carries_a_planner_of_its_own(reference):
    """TRL deep-copies the patched model for its reference model: the copy plans and reverts on its own."""
    import copy

    model = _model(False)
    fake = MemoryModel((COST,) * 4, 0.0, source="fake")
    apply_fast_kernels(model, checkpoint="auto", memory_budget_gib=5000 / GIB, memory_model=fake)
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    twin = copy.deepcopy(model)
    planner, twin_planner = checkpoint_planner(model), checkpoint_planner(twin)
    assert twin_planner is not planner and twin_planner is checkpoint_planner(twin.model)
    assert all(a is b for a, b in zip(twin_planner.layers, twin.model.layers))
    calls = _mlp_calls(twin)
    twin(input_ids=ids, labels=labels).loss.backward()
    assert [c[0] for c in calls] == [2, 2, 1, 1]
    revert_fast_kernels(twin)
    assert checkpoint_planner(twin) is None and checkpoint_planner(model) is planner


# ----------------------------------------------------------------------------------------------------------
# GPU: the measured calibration and the budget against max_memory_allocated

GPU_LLAMA = Arch("llama", "LlamaForCausalLM", "LlamaConfig",
                 _llama_like(hidden=2048, heads=32, kv=8, inter=8192, layers=8) | {"vocab_size": 32000,
                                                                                     "max_position_embeddings": 4096},
                 2)


def _gpu_model():
    model = build(GPU_LLAMA, dtype=torch.bfloat16, init_std=0.02).cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return _lora(model).train()


def _gpu_step(model, bsz, seq):
    ids = torch.randint(3, 32000, (bsz, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(seq))
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach()


@pytest.mark.gpu
def test_gpu_auto_calibrates_and_keeps_everything_with_the_default_budget():
    model = _gpu_model()
    apply_fast_kernels(model, checkpoint="auto")
    _gpu_step(model, 2, 2048)
    planner = checkpoint_planner(model.get_base_model())
    print("\n" + planner.describe())
    assert planner.measured is not None and not planner.calibration_error
    assert planner.plan.source == "measured" and planner.plan.modes == ("keep",) * 8
    analytic = planner.analytic()
    for a, m in zip(analytic.layers, planner.measured.layers):
        print(f"per token per layer: analytic keep {a.keep:.0f} cheap {a.cheap:.0f}, "
              f"measured keep {m.keep:.0f} cheap {m.cheap:.0f} full {m.full:.0f}")
        assert m.keep > m.cheap > m.full > 0


@pytest.mark.gpu
@pytest.mark.parametrize("share", [0.6, 0.3], ids=["mixed_cheap", "mixed_full"])
def test_gpu_budget_holds_against_the_measured_peak(share):
    """A budget between all-full and all-keep: the plan mixes modes, and the step's real peak stays under it."""
    model = _gpu_model()
    apply_fast_kernels(model, checkpoint="full")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    _gpu_step(model, 2, 2048)
    low = torch.cuda.max_memory_allocated()
    apply_fast_kernels(model, checkpoint="keep")
    torch.cuda.reset_peak_memory_stats()
    _gpu_step(model, 2, 2048)
    high = torch.cuda.max_memory_allocated()
    budget = low + share * (high - low)
    apply_fast_kernels(model, checkpoint="auto", memory_budget_gib=budget / GIB)
    planner = checkpoint_planner(model.get_base_model())
    first = []
    for _ in range(3):  # calibrates and plans; the real peaks check the estimate (a low one is corrected)
        _gpu_step(model, 2, 2048)
        first.append(planner.plan.describe())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    _gpu_step(model, 2, 2048)
    peak = torch.cuda.max_memory_allocated()
    print(f"\nall full {low / GIB:.2f} GiB, all keep {high / GIB:.2f} GiB, budget {budget / GIB:.2f} GiB, "
          f"auto peak {peak / GIB:.2f} GiB, correction {planner.correction / GIB:.3f} GiB; first plans: {first}; "
          f"now: {planner.describe()}")
    assert len(set(planner.plan.modes)) > 1, planner.describe()
    assert peak <= budget, f"peak {peak / GIB:.2f} GiB over the budget {budget / GIB:.2f} GiB"
