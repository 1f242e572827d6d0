"""FastKernMetricsCallback in a tiny Trainer run, ThroughputMeter, and the FLOP formula."""
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_fastkern.integrations.callbacks import (
    FastKernMetricsCallback,
    ThroughputMeter,
    attention_dims,
    datasheet_peak_tflops,
    matmul_params,
    training_flops,
)

PERF_KEYS = ("perf/tokens_per_s", "perf/step_ms", "perf/tflops", "perf/tokens")


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


class _Data(torch.utils.data.Dataset):
    """8 sequences of length 12, each with 3 right-padding positions (attention_mask 0, label -100).

    Every sequence has 9 real tokens so a batch of 2 has 18 whatever order the Trainer samples them in.
    """

    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, 101, (12,), generator=g)
        mask = torch.ones(12, dtype=torch.long)
        mask[-3:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class _Recorder(TrainerCallback):
    """Stands in for TensorBoard/W&B: records what a later callback receives in on_log."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def _trainer(tmp_path, cb: FastKernMetricsCallback, recorder: _Recorder) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0, learning_rate=1e-3)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=_Data(), callbacks=[recorder])
    cb.attach(trainer)
    return trainer


def test_callback_logs_metrics_in_trainer(tmp_path):
    cb = FastKernMetricsCallback(peak_tflops=100.0, profile_steps=(1, 2), profile_top=3)
    rec = _Recorder()
    trainer = _trainer(tmp_path, cb, rec)
    trainer.train()

    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 3
    # 2 sequences x 9 real tokens per step: the mask is counted, not the 24 padded positions
    for h in train_logs:
        for k in PERF_KEYS:
            assert k in h, f"{k} missing from log_history entry {h}"
        assert h["perf/tokens"] == 18
        assert h["perf/tokens_per_s"] > 0 and h["perf/step_ms"] > 0 and h["perf/tflops"] > 0
        assert h["perf/mfu"] == pytest.approx(h["perf/tflops"] / 100.0)
        # no CUDA here: peak memory is left out rather than logged as a fake number
        assert ("perf/peak_mem_gib" in h) == torch.cuda.is_available()
    # a callback after ours (the position of the reporting integrations) received the same metrics
    rec_train = [r for r in rec.seen if "loss" in r]
    assert all(k in r for r in rec_train for k in PERF_KEYS)
    # the profiled step produced a kernel table, a file, and kernel_ms/* keys in one log line
    assert cb.kernel_table and all(r["ms_total"] > 0 for r in cb.kernel_table)
    assert os.path.exists(tmp_path / "fastkern_kernels.txt")
    assert any(k.startswith("kernel_ms/") for h in train_logs for k in h)
    # the token-counting hook is removed at the end of training
    assert cb._hook is None


def test_meter_counts_mask_and_flops():
    model = tiny_llama()
    meter = ThroughputMeter(model, peak_tflops=1.0)
    ids = torch.zeros(3, 10, dtype=torch.long)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0
    meter.count(ids, mask)
    meter.count(ids, mask)
    meter.step_done()
    m = meter.metrics()
    assert m["perf/tokens"] == 2 * 26
    n = matmul_params(model)
    L, H, D = attention_dims(model.config)
    flops = training_flops(n, 52, L, H, D, 2 * 3 * 10 * 10)
    elapsed_s = m["perf/step_ms"] / 1e3
    assert m["perf/tflops"] == pytest.approx(flops / elapsed_s / 1e12, rel=1e-6)
    assert m["perf/tokens_per_s"] == pytest.approx(52 / elapsed_s, rel=1e-6)
    # metrics() starts a new interval
    meter.step_done()
    assert meter.metrics()["perf/tokens"] == 0


def test_flop_formula_and_param_count():
    untied, tied = tiny_llama(False), tiny_llama(True)
    emb = untied.get_input_embeddings().weight.numel()
    assert matmul_params(untied) == sum(p.numel() for p in untied.parameters()) - emb
    # a tied lm_head is one tensor used as a matmul: counted once
    assert matmul_params(tied) == sum(p.numel() for p in tied.parameters())
    assert attention_dims(untied.config) == (2, 4, 8)
    # 6*N*T + 6*L*H*D*S^2 per sequence (causal): Llama-1.5B, batch 4 x 2048
    assert training_flops(1_236_000_000, 8192, 16, 32, 128, 4 * 2048**2) == pytest.approx(
        6 * 1.236e9 * 8192 + 6 * 16 * 32 * 128 * 4 * 2048**2)
    assert datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert datasheet_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert datasheet_peak_tflops("Some Unknown GPU") is None
