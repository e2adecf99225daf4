"""Probes: what the trainer measures about the student besides the loss, for the exposure policy and the logs.

- :func:`probe_nll`: the student's NLL per token of fixed reference solutions given the student prompt (the
  ``probe_nll`` signal; logged every ``--probe-every`` steps);
- :func:`probe_accuracy`: the student's greedy verified accuracy on fixed training problems (the ``accuracy``
  signal, measured at each decision's start and, on long holds, up to ``--controller-probe-points`` times per
  decision).

Both sets are fixed for the run: :func:`probe_set` draws them from the training rows by the run's seed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from atesd.engine.evaluation import grade_all, task_grader
from atesd.engine.exposure import Example
from atesd.engine.loss import token_logprobs
from atesd.engine.models import lm_head_weight
from atesd.engine.packing import Segment, pack
from atesd.engine.scoring import _gather, hidden_states
from atesd.engine.task import Task


def probe_set(
    example: Callable[[int], Example | None], n_rows: int, seed: int, size: int, stream: int
) -> list[Example]:
    """``size`` fixed training examples, drawn by ``seed`` and ``stream`` from ``n_rows`` rows (``example(i)``:
    the tokenized row i, or None when it is skipped)."""
    order = np.random.default_rng([seed, stream]).permutation(n_rows)
    probe = []
    for i in order[: 4 * size]:
        ex = example(int(i))
        if ex is not None and len(probe) < size:
            probe.append(ex)
    return probe


@torch.no_grad()
def probe_nll(model, examples: list[Example], attention: str) -> float:
    """Student NLL (per token) of the examples' reference solutions given the student prompt."""
    trees = [[Segment(ex.student_prompt), Segment(ex.student_reply_ids, 0)] for ex in examples]
    packed = pack(trees)
    h, tgt = _gather(hidden_states(model, packed, attention), packed, trees, lambda t: [1])
    return -token_logprobs(h, lm_head_weight(model), tgt).mean().item()


@torch.no_grad()
def probe_accuracy(model, rollout, tokenizer, task: Task, examples: list[Example], *, max_new_tokens: int,
                   eos_ids: set[int]) -> float:
    """Greedy accuracy of the student ``model`` (decoded by ``rollout``, the run's rollout engine over it) on the
    examples, graded by the task's verifier (math-verify in a worker when the task has none)."""
    model.eval()
    outs = rollout.sample(
        [ex.student_prompt for ex in examples], num_samples=1, max_new_tokens=max_new_tokens,
        eos_ids=eos_ids, pad_id=tokenizer.pad_token_id, temperature=0.0,
    )  # fmt: skip
    texts = tokenizer.batch_decode([g[0] for g in outs], skip_special_tokens=True)
    with task_grader(task, workers=1) as grader:
        flags = grade_all(grader, texts, [ex.answer for ex in examples])
    return sum(flags) / len(flags)
