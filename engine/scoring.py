"""Teacher and student scoring over prefix-sharing trees (DESIGN 4.2).

Per problem, with a cut of the reasoning revealed (``Example.cut``) and rollouts r_1..r_G:

    teacher tree   teacher prompt(cut) -> r_1 | ... | r_G
                                       -> y* = the whole reference solution   (credit branch)
    student tree   student prompt -> r_1 | ... | r_G

where teacher prompt(cut) is the ids of the rendered teacher text (problem, exposed reference, instruction,
assistant turn; ``engine.exposure``) tokenized whole, and y* the reference's ids as the tokenizer reads them
after that prompt. Rollout ids are the student's own tokens, appended as they were sampled (as OPSD does).
so the teacher prompt (problem, exposed reference, instruction, assistant turn) is run once per problem, not
once per branch. The credit branch is the paper's teacher-grounded score: the verified reference solution y*
(all of it, whatever alpha) teacher-forced as the reply in the very context the teacher scores rollouts
from, so for step t over its B problems

    credit_t = sum_b sum_j log p_T(y*_bj | teacher prompt_b(alpha_t), y*_b<j) / sum_b |y*_b|

(token-weighted, temperature 1). Its token set does not depend on alpha; its context does, which is the
point (a teacher that still predicts the ground-truth solution at this exposure). It is computed only when
asked (the exposure policy uses it), since it adds |y*| tokens per problem to the teacher pass.
Returned hidden states are ordered problem by problem, rollout by rollout, token by token, on both sides.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from atesd.engine.exposure import Example
from atesd.engine.models import causal_lm, decoder
from atesd.engine.packing import Packed, Segment, pack

log = logging.getLogger("engine")
# FlexAttention failures by (device type, grad enabled): why flex cannot run there (the dense mask runs instead,
# logged once per key); the teacher's no-grad pass may keep flex where the student's backward cannot have it
_flex_failures: dict[tuple[str, bool], str] = {}
_flex_probed: set[tuple[str, bool]] = set()  # (device type, True) keys whose forward + backward probe ran
_attention_used: str | None = None


def teacher_tree(ex: Example, cut: int, rollouts: list[list[int]], credit: bool = True) -> list[Segment]:
    """Root = the teacher prompt with ``cut`` reasoning characters revealed; its children: the rollouts, then
    (credit) the whole reference solution."""
    tree = [Segment(ex.teacher_prompt(cut))] + [Segment(r, 0) for r in rollouts]
    return tree + [Segment(ex.teacher_reply_ids, 0)] if credit else tree


def student_tree(ex: Example, rollouts: list[list[int]]) -> list[Segment]:
    return [Segment(ex.student_prompt)] + [Segment(r, 0) for r in rollouts]


def paths(tree: list[Segment]) -> list[list[Segment]]:
    """The same tree without sharing: one single-segment tree per leaf (its whole root-to-leaf path)."""
    parents = {s.parent for s in tree}
    out = []
    for i in range(len(tree)):
        if i in parents:
            continue
        chain, j = [], i
        while j >= 0:
            chain.append(tree[j].tokens)
            j = tree[j].parent
        out.append([Segment([t for seg in reversed(chain) for t in seg])])
    return out


@contextlib.contextmanager
def attention_impl(model, name: str | None):
    """Switch the attention implementation for a call (FlexAttention honours a BlockMask only then)."""
    lm = causal_lm(model)
    old = lm.config._attn_implementation
    if name is None or name == old:
        yield
        return
    lm.set_attn_implementation(name)
    try:
        yield
    finally:
        lm.set_attn_implementation(old)


def attention_used() -> str | None:
    """The tree-mask attention the last :func:`hidden_states` call ran: 'flex', 'dense', or 'dense (flex failed:
    <reason>)' when flex was asked for and could not run (None before the first call)."""
    return _attention_used


def _reason(e: Exception) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def flex_backward_failure(model, device: torch.device) -> str | None:
    """Why FlexAttention cannot run forward *and backward* for ``model`` on ``device`` (None: it can): a small tree
    (a root and two branches, 16 tokens) through the decoder under flex, differentiated with respect to its input
    embeddings only, so no parameter's ``.grad`` changes. Without it, a backward that fails after a working forward
    would surface inside a training step's ``loss.backward()``, past the point where the dense mask can take over.
    Out of memory is raised."""
    probe = pack([[Segment(list(range(1, 9))), Segment(list(range(9, 13)), 0), Segment(list(range(13, 17)), 0)]])
    dec = decoder(model)
    embed = dec.get_input_embeddings()
    ids = (probe.input_ids % embed.num_embeddings).to(device)
    try:
        with attention_impl(model, "flex_attention"):
            emb = embed(ids).detach().requires_grad_(True)
            out = dec(inputs_embeds=emb, position_ids=probe.position_ids.to(device),
                      attention_mask=probe.block_mask(device), use_cache=False)[0]
            torch.autograd.grad(out.float().sum(), emb)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 (any failure means: not this device and mode)
        return _reason(e)
    return None


def hidden_states(model, packed: Packed, attention: str = "dense") -> torch.Tensor:
    """Final hidden states [N, H] of a packed sequence: Flex BlockMask ('flex') or dense additive mask.

    A flex failure (an unsupported build or device, e.g. no FlexAttention backward on CPU) is logged as a warning
    on the ``engine`` logger (run.log in a run) with its reason, once per (device, grad mode); that call and the
    later ones with the same key run the dense N x N mask, and :func:`attention_used` says so. With gradients on,
    the first flex call per device first runs :func:`flex_backward_failure`, so a backward that would fail after a
    working forward is caught here too. Out of memory is raised, not hidden behind the dense mask (which needs
    more)."""
    global _attention_used
    param = next(model.parameters())
    ids, pos = packed.input_ids.to(param.device), packed.position_ids.to(param.device)
    path = "dense"
    if attention == "flex":
        key = (param.device.type, torch.is_grad_enabled())
        if key[1] and key not in _flex_failures and key not in _flex_probed:
            _flex_probed.add(key)
            why = flex_backward_failure(model, param.device)
            if why:
                _flex_failed(key, why, " (a forward + backward probe)")
        if key not in _flex_failures:
            try:
                with attention_impl(model, "flex_attention"):
                    mask = packed.block_mask(param.device)
                    out = decoder(model)(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)
                _attention_used = "flex"
                return out[0][0]
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # unsupported build or device: the dense mask, loudly, and recorded
                _flex_failed(key, _reason(e))
        path = f"dense (flex failed: {_flex_failures[key]})"
    mask = packed.dense_mask(param.dtype, param.device)
    out = decoder(model)(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)[0][0]
    _attention_used = path
    return out


def _flex_failed(key: tuple[str, bool], reason: str, where: str = "") -> None:
    _flex_failures[key] = reason
    log.warning("scoring: FlexAttention tree mask failed on %s (%s)%s (%s); the dense N x N mask runs instead for "
                "this device and mode", key[0], "with grad" if key[1] else "no grad", where, reason)


def _gather(
    h: torch.Tensor, packed: Packed, trees: list[list[Segment]], which
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states predicting the chosen segments' tokens, and those tokens: ([n, H], [n] long)."""
    idx, tgt = [], []
    for t, tree in enumerate(trees):
        parents = [s.parent for s in tree]
        for s in which(tree):
            idx.append(packed.prediction_index(t, s, parents))
            tgt.append(torch.tensor(tree[s].tokens, dtype=torch.long))
    index = torch.cat(idx).to(h.device)
    return h.index_select(0, index), torch.cat(tgt).to(h.device)


def score_teacher(
    model,
    examples: list[Example],
    cuts: list[int],
    rollouts: list[list[list[int]]],
    attention: str = "dense",
    credit: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """No grad. (teacher hidden at rollout tokens [n, H], credit hidden [m, H], credit targets [m]); the
    last two are None when ``credit`` is False."""
    trees = [teacher_tree(ex, c, r, credit) for ex, c, r in zip(examples, cuts, rollouts)]
    packed = pack(trees)
    with torch.no_grad():
        h = hidden_states(model, packed, attention)
    ht, _ = _gather(h, packed, trees, lambda tree: range(1, len(tree) - int(credit)))
    if not credit:
        return ht, None, None
    hc, tc = _gather(h, packed, trees, lambda tree: [len(tree) - 1])
    return ht, hc, tc


def score_student(
    model, examples: list[Example], rollouts: list[list[list[int]]], attention: str = "dense"
) -> tuple[torch.Tensor, torch.Tensor]:
    """With grad. (student hidden at rollout tokens [n, H], the rollout tokens [n])."""
    trees = [student_tree(ex, r) for ex, r in zip(examples, rollouts)]
    packed = pack(trees)
    h = hidden_states(model, packed, attention)
    return _gather(h, packed, trees, lambda tree: range(1, len(tree)))
