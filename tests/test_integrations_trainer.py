"""``hf_fastkern.FastKernels``: the one switch for Trainer and TRL (``hf_fastkern/integrations/trainer.py``).

Every training case runs two optimizer steps three times from one init and one data order: the unpatched
model in fp64 (the oracle), the unpatched model in fp32 (PyTorch's baseline) and the model patched by the
callback; the per-micro-batch losses are judged with the tolerance table (kind "output"). TRL's SFTConfig
turns gradient checkpointing on by default; the PEFT and patched-before cases keep it, the plain and
padding-free ones turn it off (the interpreter's time). Tiny Llama (hidden 64, 2 layers),
a word-level tokenizer built in memory: no downloads.
"""
from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

import trl.trainer.utils as trl_utils  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: E402

import hf_fastkern.integrations.trl_head as fk_trl_head  # noqa: E402
import hf_fastkern.patches.loss as fk_loss  # noqa: E402
from hf_fastkern import FastKernels, apply_fast_kernels, report  # noqa: E402
from hf_fastkern.integrations.trl_head import fastkern_head_active, use_fastkern_head  # noqa: E402
from hf_fastkern.kernels import attention as fk_attention  # noqa: E402
from hf_fastkern.patches.apply import is_patched  # noqa: E402
from tests.harness import CallCounter  # noqa: E402
from tests.test_patch_archs import ARCHS, VOCAB, build  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

LLAMA = ARCHS[0]
STEPS = 2


def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over 't0' ... 't255' (ids = the number), built in memory."""
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", unk_token="t1", eos_token="t2")


def sft_rows(n: int = 8, seed: int = 0) -> list[dict]:
    """Pre-tokenized ragged rows (SFTTrainer keeps an ``input_ids`` dataset as it is)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB, (int(torch.randint(5, 17, (1,), generator=g)),),
                                        generator=g).tolist()} for _ in range(n)]


class RecordingSFT(SFTTrainer):
    """Records every micro-batch loss at full precision (the logged loss is rounded)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        self.losses.append((out[0] if return_outputs else out).detach().double().item())
        return out


def lora_config():
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"])


def train_sft(model, tmp_path, *, callbacks=(), use_peft=False, padding_free=False, gc=True):
    args = SFTConfig(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-3,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=1, report_to=[],
                     use_cpu=next(model.parameters()).device.type == "cpu", seed=0, data_seed=0, save_strategy="no", disable_tqdm=True, bf16=False,
                     padding_free=padding_free, max_length=None if padding_free else 1024,
                     gradient_checkpointing=gc)
    trainer = RecordingSFT(model=model, args=args, train_dataset=datasets.Dataset.from_list(sft_rows()),
                           processing_class=tokenizer(), callbacks=list(callbacks),
                           peft_config=lora_config() if use_peft else None)
    trainer.train()
    assert len(trainer.losses) == STEPS
    return trainer, torch.tensor(trainer.losses, dtype=torch.float64)


def three_sft_runs(tmp_path, fk: FastKernels, dtype: torch.dtype = torch.float32, device: str = "cpu", **kw):
    """(oracle fp64, baseline, patched) loss curves of one init (model weights in ``dtype`` on ``device``);
    returns the patched trainer too."""
    ref = build(LLAMA)
    _, oracle = train_sft(copy.deepcopy(ref).double().to(device), tmp_path / "oracle", **kw)
    _, base = train_sft(copy.deepcopy(ref).to(device, dtype), tmp_path / "base", **kw)
    trainer, patched = train_sft(copy.deepcopy(ref).to(device, dtype), tmp_path / "patched", callbacks=[fk], **kw)
    assert len(set(patched.tolist())) > 1, "the loss never changed: nothing trained"
    return oracle, base, patched, trainer


def test_options_are_checked_when_built():
    with pytest.raises(TypeError, match="unknown option"):
        FastKernels(atention=False)


def test_sft_plain_one_fused_head(tmp_path, monkeypatch):
    ours = CallCounter(fk_loss.fused_linear_cross_entropy)
    monkeypatch.setattr(fk_loss, "fused_linear_cross_entropy", ours)
    theirs = CallCounter(trl_utils._ChunkedLogProbFunction.apply)
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", theirs)
    fk = FastKernels(verbose=False)
    # checkpointing off here (on in the PEFT case): the interpreter's time is the forward, run twice with it
    oracle, base, patched, trainer = three_sft_runs(tmp_path, fk, gc=False)
    assert_close(patched, oracle, base, torch.float32, "output", "SFTTrainer losses")
    assert fk.report is not None and fk.report.count("cross_entropy") == 1, str(fk.report)
    assert fk.report.count("norm") > 0 and fk.report.count("attention") == 1, str(fk.report)
    # our wrapper sits over TRL's fused head and steps aside for fused_lm_head=True: only TRL's ran
    assert ours.calls == 0 and theirs.calls > 0, (ours.calls, theirs.calls)


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "peft_config"])
def test_sft_model_patched_before_trainer(tmp_path, monkeypatch, use_peft):
    """Patching by hand before SFTTrainer (TRL's head then wraps ours; PEFT wraps the patched model) trains to
    the same losses, and the LoRA layers TRL adds are fused at the first forward. What is tested is the order
    of the wrappers, so the kernels run as their PyTorch reference."""
    monkeypatch.setenv("HF_FASTKERN_FORCE_REFERENCE", "1")
    ref = build(LLAMA)
    _, oracle = train_sft(copy.deepcopy(ref).double(), tmp_path / "oracle", use_peft=use_peft)
    _, base = train_sft(copy.deepcopy(ref), tmp_path / "base", use_peft=use_peft)
    model = copy.deepcopy(ref)
    apply_fast_kernels(model)
    trainer, patched = train_sft(model, tmp_path / "patched", use_peft=use_peft)
    assert_close(patched, oracle, base, torch.float32, "output", "SFTTrainer losses, patched before")
    assert report(trainer.model).count("lora_linear") == (14 if use_peft else 0), str(report(trainer.model))


def test_sft_peft_lora_fused(tmp_path):
    fk = FastKernels(verbose=False)
    oracle, base, patched, trainer = three_sft_runs(tmp_path, fk, use_peft=True)
    assert_close(patched, oracle, base, torch.float32, "output", "SFTTrainer + peft_config losses")
    n_lora = sum(1 for _, m in trainer.model.named_modules() if type(m).__name__ == "Linear"
                 and hasattr(m, "lora_A"))
    assert n_lora == 14
    # TRL wrapped the model with PEFT inside __init__; the callback saw the PeftModel and fused every LoRA layer
    assert fk.report.count("lora_linear") == n_lora, str(fk.report)
    assert type(trainer.model).__name__.startswith("Peft") and trainer.model.is_gradient_checkpointing


def test_sft_padding_free(tmp_path, monkeypatch):
    varlen = CallCounter(fk_attention.flash_attention_varlen)
    monkeypatch.setattr(fk_attention, "flash_attention_varlen", varlen)
    fk = FastKernels(verbose=False)
    # bf16 weights: the attention kernel takes bf16/fp16 (fp32 falls back to SDPA by design)
    oracle, base, patched, _ = three_sft_runs(tmp_path, fk, torch.bfloat16, padding_free=True, gc=False)
    assert_close(patched, oracle, base, torch.bfloat16, "output", "SFTTrainer padding_free losses")
    # the attention of the patched run went through the varlen kernel (2 layers x 2 steps at least)
    assert varlen.calls >= 2 * STEPS, varlen.calls


@pytest.mark.gpu
@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "peft_config"])
def test_sft_padding_free_gpu(tmp_path, monkeypatch, use_peft):
    """The Triton kernels on the GPU: padding-free SFT in bf16 (varlen attention), with and without LoRA."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    varlen = CallCounter(fk_attention.flash_attention_varlen)
    monkeypatch.setattr(fk_attention, "flash_attention_varlen", varlen)
    fk = FastKernels(verbose=False)
    oracle, base, patched, _ = three_sft_runs(tmp_path, fk, torch.bfloat16, "cuda", padding_free=True,
                                              use_peft=use_peft)
    assert_close(patched, oracle, base, torch.bfloat16, "output", f"SFTTrainer padding_free GPU peft={use_peft}")
    assert varlen.calls >= 2 * STEPS, varlen.calls
    assert fk.report.count("lora_linear") == (14 if use_peft else 0), str(fk.report)


def packed_batch(rows: list[dict]) -> dict:
    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)


def seq_loss_and_grads(model, batch: dict, mask: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Summed next-token loss of ``batch`` (labels outside ``mask`` ignored) and the parameters' gradients."""
    labels = batch["labels"].clone()
    if mask is not None:
        labels[~mask] = -100
    model.zero_grad(set_to_none=True)
    out = model(**{**batch, "labels": labels}, num_items_in_batch=torch.tensor(1))
    out.loss.backward()
    return out.loss.detach().double(), [p.grad.double().clone() for p in model.parameters()]


def test_packed_equals_separate(monkeypatch):
    """A padding-free packed batch (TRL's collator) gives each sequence's loss and the summed gradients of the
    same sequences run one by one: varlen attention, RoPE on the packed position_ids, the fused loss masking
    the boundaries as TRL's labels say. bf16 weights (the attention kernel's dtypes), fp64 oracle."""
    varlen = CallCounter(fk_attention.flash_attention_varlen)
    monkeypatch.setattr(fk_attention, "flash_attention_varlen", varlen)
    rows = sft_rows(3, seed=3)
    ref = build(LLAMA)
    ref.train()
    patched = copy.deepcopy(ref).to(torch.bfloat16)
    apply_fast_kernels(patched)
    packed = packed_batch(rows)
    seg = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(r["input_ids"]) for r in rows]))[None]

    def separate(model, dtype):
        m = copy.deepcopy(model).to(dtype)
        losses, grads = [], None
        for r in rows:
            loss, g = seq_loss_and_grads(m, packed_batch([r]), None)
            losses.append(loss)
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        return torch.stack(losses), grads

    oracle_l, oracle_g = separate(ref, torch.float64)
    base_l, base_g = separate(ref, torch.bfloat16)
    per_seq = torch.stack([seq_loss_and_grads(patched, packed, seg == i)[0] for i in range(len(rows))])
    assert varlen.calls >= LLAMA.kwargs["num_hidden_layers"] * len(rows), varlen.calls
    _, packed_g = seq_loss_and_grads(patched, packed, None)
    assert_close(per_seq, oracle_l, base_l, torch.bfloat16, "output", "packed per-sequence losses")
    for (name, _), a, o, b in zip(ref.named_parameters(), packed_g, oracle_g, base_g):
        assert_close(a, o, b, torch.bfloat16, "grad", f"packed grad {name}")


def dpo_rows(n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(5)

    def text(k):
        return " ".join(f"t{i}" for i in torch.randint(3, VOCAB, (k,), generator=g).tolist())
    return [{"prompt": text(5), "chosen": text(4), "rejected": text(4)} for _ in range(n)]


@pytest.mark.parametrize("patch_ref", [False, True], ids=["ref_untouched", "patch_ref_model"])
def test_dpo_policy_patched_reference_not(tmp_path, patch_ref, monkeypatch):
    monkeypatch.setenv("HF_FASTKERN_FORCE_REFERENCE", "1")
    policy = build(LLAMA)
    ref_model = copy.deepcopy(policy)
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, save_strategy="no", disable_tqdm=True, learning_rate=1e-3, bf16=False)
    trainer = DPOTrainer(model=policy, ref_model=ref_model, args=args, processing_class=tokenizer(),
                         train_dataset=datasets.Dataset.from_list(dpo_rows()))
    fk = FastKernels(verbose=False, patch_ref_model=patch_ref).attach(trainer)
    trainer.train()
    assert is_patched(trainer.model) and fk.report.count("norm") > 0, str(fk.report)
    assert is_patched(trainer.ref_model) is patch_ref
    assert (fk.ref_report is not None) is patch_ref


def test_patch_ref_model_needs_attach(tmp_path):
    model = build(LLAMA)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True)
    rows = [{"input_ids": r["input_ids"][:5], "labels": r["input_ids"][:5]} for r in sft_rows(2)]
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      callbacks=[FastKernels(verbose=False, patch_ref_model=True)])
    with pytest.raises(ValueError, match="attach"):
        trainer.train()


def test_trainer_plain_and_second_train_idempotent(tmp_path):
    """Plain transformers Trainer: patched at train begin; a second train() patches nothing new."""
    model = build(LLAMA)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, per_device_train_batch_size=2)
    rows = [{"input_ids": r["input_ids"][:5], "labels": r["input_ids"][:5]} for r in sft_rows(4)]
    fk = FastKernels(verbose=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[fk])
    trainer.train()
    first = fk.report
    assert first.changed and is_patched(model)
    trainer.train()
    assert not fk.report.changed and fk.report.count("norm") == first.count("norm"), str(fk.report)


@pytest.mark.parametrize("head", ["trl", "fastkern"])
def test_trl_fused_head_same_loss_and_grads(head, monkeypatch):
    """TRL's fused_lm_head=True call on a patched model gives the unpatched model's loss, per-token log-probs
    and gradients, with exactly one fused head running: TRL's (ours steps aside) or ours (use_fastkern_head)."""
    ours = CallCounter(fk_trl_head.fused_linear_cross_entropy)
    monkeypatch.setattr(fk_trl_head, "fused_linear_cross_entropy", ours)
    loss_ours = CallCounter(fk_loss.fused_linear_cross_entropy)
    monkeypatch.setattr(fk_loss, "fused_linear_cross_entropy", loss_ours)
    theirs = CallCounter(trl_utils._ChunkedLogProbFunction.apply)
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", theirs)
    ref = build(LLAMA)
    ref.train()
    batch = DataCollatorForLanguageModeling(pad_token_id=0)(sft_rows(3, seed=7))

    def run(model, patch: bool):
        trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        if patch:
            apply_fast_kernels(model)
            if head == "fastkern":
                assert use_fastkern_head(model) == (True, "") and fastkern_head_active(model)
        model.zero_grad(set_to_none=True)
        out = model(**batch, fused_lm_head=True)
        out.loss.backward()
        return out, [p.grad.double() for p in model.parameters()]

    oracle, oracle_g = run(copy.deepcopy(ref).double(), False)
    base, base_g = run(copy.deepcopy(ref), False)
    theirs.calls = 0
    got, got_g = run(copy.deepcopy(ref), True)
    assert (ours.calls, theirs.calls, loss_ours.calls) == ((1, 0, 0) if head == "fastkern" else (0, 1, 0))
    assert torch.equal(got.label_mask, oracle.label_mask)
    assert_close(got.loss.double()[None], oracle.loss[None], base.loss.double()[None], torch.float32, "output",
                 f"{head} head loss")
    assert_close(got.log_probs.double(), oracle.log_probs, base.log_probs.double(), torch.float32, "output",
                 f"{head} head log_probs")
    for (name, _), a, o, b in zip(ref.named_parameters(), got_g, oracle_g, base_g):
        assert_close(a, o, b, torch.float32, "grad", f"{head} head grad {name}")
    if head == "fastkern":
        # not computed by our kernel: NaN, never a made-up number
        assert torch.isnan(got.entropy).all() and torch.isnan(got.is_top1).all()


def test_sft_fastkern_head_switch(tmp_path, monkeypatch):
    """FastKernels(lm_head="fastkern") in SFTTrainer: our head answers TRL's calls and trains to the same losses
    (wiring test: kernels as their PyTorch reference)."""
    monkeypatch.setenv("HF_FASTKERN_FORCE_REFERENCE", "1")
    ours = CallCounter(fk_trl_head.fused_linear_cross_entropy)
    monkeypatch.setattr(fk_trl_head, "fused_linear_cross_entropy", ours)
    fk = FastKernels(verbose=False, lm_head="fastkern")
    oracle, base, patched, trainer = three_sft_runs(tmp_path, fk)
    assert_close(patched, oracle, base, torch.float32, "output", "SFTTrainer losses, fastkern head")
    assert ours.calls == STEPS and "hf_fastkern fused linear" in fk.lm_head_note, fk.lm_head_note
    with pytest.raises(ValueError, match="lm_head"):
        FastKernels(lm_head="liger")
