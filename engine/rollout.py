"""On-policy rollouts: each prompt is prefilled once and its KV cache is shared by its G samples.

Two loops behind one ``sample(prompts, ...)`` contract, chosen by ``--rollout`` (:func:`build_rollout`):

- ``hf``: ``engine/hf_rollout.py``, the reference loop: every token is one eager HF forward over a DynamicCache,
  finished rows kept to the end.
- ``static`` / ``compiled``: ``engine/decode.py``, a static KV cache, finished rows leaving the batch, LoRA merged
  into fused copies, sampling on device; ``compiled`` puts each decode step through ``torch.compile`` (CUDA graphs
  on GPU).

Both draw tokens with temperature / top-k / top-p by inverse-CDF sampling at per-row uniforms
(``engine/sampling.py``, which both import; neither imports the other): row (prompt b, sample g) depends only on
the weights and ``seeds[b]``, whatever else is in the batch, so the ranks of a data-parallel run sample what one
process would, and the loops give the same rollouts for the same seeds (up to float ties;
``tests/engine/test_rollout_static.py``).
"""

from __future__ import annotations

import logging

import torch

from atesd.engine.decode import StaticRollout, unsupported
from atesd.engine.errors import UsageError
from atesd.engine.hf_rollout import HFRollout

log = logging.getLogger("engine")
ROLLOUTS = ("auto", "hf", "static", "compiled")


def build_rollout(kind: str, model, device: torch.device | str | None = None):
    """The rollout engine for ``--rollout kind``, built once per run; ``.sample(prompts, ...)`` as
    ``hf_rollout.sample``.

    ``auto`` picks per device (measured, benchmarks/RESULTS.md): on CUDA the compiled static-cache loop
    (launch-bound decoding is what CUDA graphs remove); on CPU the eager static-cache loop, because inductor's
    compile time (tens of seconds) outweighs what it saves on a short CPU run. A model the static decoder does not
    implement gets ``hf`` under ``auto`` (logged) and an error under ``static``/``compiled``. An FSDP model
    (``--fsdp lora|full``) is no exception: its rollouts run inside ``DataParallel.gathered()``, where the static
    decoder reads the gathered weights (``engine/decode.py``: a transient decoder per rollout).
    """
    if kind not in ROLLOUTS:
        raise UsageError(f"--rollout: {kind!r} is not one of {', '.join(ROLLOUTS)}")
    if kind == "hf":
        log.info("rollout: hf (the eager HF loop)")
        return HFRollout(model)
    reason = unsupported(model)
    if reason:
        if kind != "auto":
            raise UsageError(f"--rollout {kind}: the static decoder does not support this model: {reason}")
        log.info("rollout: %s; using the HF loop (--rollout hf)", reason)
        return HFRollout(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    compiled = kind == "compiled" or (kind == "auto" and device.type == "cuda")
    engine = StaticRollout(model, compile=compiled)
    log.info("rollout: %s", engine.name)
    return engine
