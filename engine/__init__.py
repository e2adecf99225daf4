"""Training engine for on-policy self-distillation with adaptive teacher exposure: ``python -m engine.train``.

Modules: ``exposure`` (reference truncation, prompts), ``data`` (rows, skipping), ``rollout`` (KV-shared
sampling), ``packing`` / ``scoring`` (prefix-sharing trees), ``loss`` (the fused KL op), ``models`` (presets,
LoRA, teacher views), ``config`` / ``train`` (CLI, loop, checkpoints).
"""
