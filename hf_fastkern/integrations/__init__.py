"""Floor 4: Trainer / TRL / Accelerate integrations built on ``hf_fastkern.patches``: the metrics callback
(callbacks.py), the one-switch patching callback ``FastKernels`` (trainer.py), which fused head serves TRL's
``fused_lm_head`` calls (trl_head.py) and transformers' ``use_kernels`` mapping (hub_kernels.py)."""
