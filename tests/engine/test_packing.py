"""Exactness of prefix sharing: hidden states from the packed tree equal those of running every path alone."""

import logging

import pytest
import torch
from engine_tiny import build_model

from atesd.engine import scoring
from atesd.engine.exposure import make_example as _make_example
from atesd.engine.models import add_lora, decoder
from atesd.engine.packing import Packed, Segment, pack
from atesd.engine.scoring import (
    attention_used,
    hidden_states,
    paths,
    score_student,
    score_teacher,
    student_tree,
    teacher_tree,
)
from atesd.engine.task import PromptTemplates

SOLUTIONS = ["1+2=3\n3*4=12\nSo \\boxed{12}", "5-1=4\nthen 4*4=16\nand 16+1=17\nSo \\boxed{17}"]
PROBLEMS = ["(1+2)*4?", "(5-1)*4+1?"]
# short prompts (the lab's format): exactness does not depend on the template, and short sequences keep
# the float32 comparisons of the gradient test well inside their tolerance
SHORT = PromptTemplates("{problem}", "{problem}\n\nReference solution:\n{reference}\n\n{instruction}",
                        "Now solve the problem yourself, step by step, ending with the final answer in \\boxed{}.",
                        teacher_thinking=False)


def make_example(tok, problem, solution):
    return _make_example(tok, problem, solution, templates=SHORT)


def _lora_model(vocab: int):
    model = add_lora(build_model(vocab), r=4, alpha=8)
    with torch.no_grad():  # random B so the adapter changes the function (peft initialises B = 0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model


def _alone(model, tokens: list[int]) -> torch.Tensor:
    return decoder(model)(input_ids=torch.tensor([tokens]), use_cache=False).last_hidden_state[0]


def _rollouts(G: int, seed: int) -> list[list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    return [
        [
            torch.randint(5, 100, (int(n),), generator=g).tolist()
            for n in torch.randint(2, 9, (G,), generator=g)
        ]
        for _ in PROBLEMS
    ]


def test_pack_positions_and_mask():
    p = pack([[Segment([1, 2, 3]), Segment([4, 5], 0), Segment([6], 0)], [Segment([7, 8])]])
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1]]
    allowed = p.dense_mask(torch.float32, "cpu")[0, 0] == 0
    assert allowed[5].tolist() == [True, True, True, False, False, True, False, False]  # sibling hidden
    assert allowed[7].tolist() == [False] * 6 + [True, True]  # other tree hidden
    with pytest.raises(ValueError, match="empty"):
        pack([[Segment([])]])


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("adapter", [True, False])
def test_tree_equals_separate_paths(tiny_tokenizer, G, adapter):
    model = _lora_model(len(tiny_tokenizer))
    examples = [make_example(tiny_tokenizer, p, s) for p, s in zip(PROBLEMS, SOLUTIONS)]
    cuts = [3, 7]  # unequal reveals (reasoning characters); the rollouts have unequal lengths too
    rollouts = _rollouts(G, seed=G)
    ctx = model.disable_adapter() if not adapter else torch.enable_grad()
    with ctx:
        ht, hc, tc = score_teacher(model, examples, cuts, rollouts)
        hs, ts = score_student(model, examples, rollouts)
        # the same quantities path by path
        exp_t, exp_s, exp_c, exp_tc = [], [], [], []
        with torch.no_grad():
            for ex, cut, group in zip(examples, cuts, rollouts):
                prompt = ex.teacher_prompt(cut)
                for r in group:
                    exp_t.append(_alone(model, prompt + r)[len(prompt) - 1 : len(prompt) + len(r) - 1])
                    exp_s.append(_alone(model, ex.student_prompt + r)[len(ex.student_prompt) - 1 : -1])
                # credit: the whole reference as the reply, in the context the rollouts are scored from
                credit = ex.teacher_reply_ids
                exp_c.append(_alone(model, prompt + credit)[len(prompt) - 1 : -1])
                exp_tc.append(torch.tensor(credit))
    assert ht.shape == hs.shape == (sum(len(r) for g in rollouts for r in g), model.config.hidden_size)
    torch.testing.assert_close(ht, torch.cat(exp_t), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hs.detach(), torch.cat(exp_s), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hc, torch.cat(exp_c), atol=1e-5, rtol=1e-5)
    assert tc.tolist() == torch.cat(exp_tc).tolist()
    assert ts.tolist() == [t for g in rollouts for r in g for t in r]
    with model.disable_adapter() if not adapter else torch.enable_grad():  # no credit branch: same states
        ht2, hc2, tc2 = score_teacher(model, examples, cuts, rollouts, credit=False)
    assert hc2 is None and tc2 is None
    torch.testing.assert_close(ht2, ht, atol=1e-5, rtol=1e-5)


def test_student_gradient_matches_separate(tiny_tokenizer):
    model = _lora_model(len(tiny_tokenizer))
    examples = [make_example(tiny_tokenizer, p, s) for p, s in zip(PROBLEMS, SOLUTIONS)]
    rollouts = _rollouts(3, seed=5)
    weights = torch.randn(sum(len(r) for g in rollouts for r in g), model.config.hidden_size)
    params = [p for p in model.parameters() if p.requires_grad]
    hs, _ = score_student(model, examples, rollouts)
    packed_grads = torch.autograd.grad((hs * weights).sum(), params)
    sep = torch.cat(
        [
            _alone(model, ex.student_prompt + r)[len(ex.student_prompt) - 1 : -1]
            for ex, group in zip(examples, rollouts)
            for r in group
        ]
    )
    sep_grads = torch.autograd.grad((sep * weights).sum(), params)
    for a, b in zip(packed_grads, sep_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_paths_unshares_a_tree(tiny_tokenizer):
    ex = make_example(tiny_tokenizer, PROBLEMS[0], SOLUTIONS[0])
    tree = teacher_tree(ex, 2, [[9, 9], [8]])
    leaves = [p[0].tokens for p in paths(tree)]
    assert leaves[0] == ex.teacher_prompt(2) + [9, 9] and leaves[1] == ex.teacher_prompt(2) + [8]
    assert leaves[2] == ex.teacher_prompt(2) + ex.teacher_reply_ids  # the credit branch
    assert len(paths(student_tree(ex, [[1], [2], [3]]))) == 3


# ------------------------------------------------------------------------------------------- FlexAttention
def test_flex_tree_mask_equals_dense_without_grad(tiny_tokenizer):
    """The teacher pass with FlexAttention (the compiled block mask, HF's compiled flex_attention; forward only:
    torch has no FlexAttention backward on CPU) gives the dense tree mask's hidden states. Cost: two compiles,
    ~10-30 s on 2 cores with a cold inductor cache."""
    model = _lora_model(len(tiny_tokenizer))
    examples = [make_example(tiny_tokenizer, p, s) for p, s in zip(PROBLEMS, SOLUTIONS)]
    trees = [teacher_tree(ex, k, r) for ex, k, r in zip(examples, [3, 7], _rollouts(3, seed=1))]
    packed = pack(trees)
    with torch.no_grad():
        dense = hidden_states(model, packed, "dense")
        assert attention_used() == "dense"
        flex = hidden_states(model, packed, "flex")
        assert attention_used() == "flex"
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_block_mask_never_materialises_n_by_n():
    """Packed.block_mask at N=8192 allocates nothing near an N x N mask (the profiler's largest CPU allocation;
    eager create_block_mask's is 512 MiB there, an int64 N x N), and its block tables are the eager ones. The
    compile (dynamic sizes, once per process, shared with the test above) is ~15-40 s on 2 cores."""
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.profiler import ProfilerActivity, profile

    def packed(n_trees, prompt, branches):
        return pack([[Segment(list(range(prompt)))] + [Segment(list(range(b)), 0) for b in branches]] * n_trees)

    small = packed(3, 200, [90, 80, 70])
    got = small.block_mask("cpu")  # compiles here unless an earlier test did
    want = create_block_mask(lambda b, h, q, k: (k <= q) & small.ancestor[small.seg[q], small.seg[k]], None, None,
                             small.numel, small.numel, device="cpu")
    assert torch.equal(got.kv_num_blocks, want.kv_num_blocks) and torch.equal(got.to_dense(), want.to_dense())
    big = packed(4, 1024, [512, 256, 256])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        mask = big.block_mask("cpu")
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert big.numel == 8192 and mask.kv_num_blocks.shape[-1] == 8192 // 128
    assert 0 < largest < 8192**2 / 64, f"largest allocation {largest} bytes"


def test_flex_failure_is_logged_recorded_and_falls_back_to_dense(tiny_tokenizer, monkeypatch, caplog):
    model = _lora_model(len(tiny_tokenizer))
    examples = [make_example(tiny_tokenizer, p, s) for p, s in zip(PROBLEMS, SOLUTIONS)]
    packed = pack([student_tree(ex, r) for ex, r in zip(examples, _rollouts(2, seed=4))])
    monkeypatch.setattr(scoring, "_flex_failures", {})
    monkeypatch.setattr(scoring, "_flex_probed", set())

    def broken(self, device):
        raise RuntimeError("flex kernels unavailable here")

    monkeypatch.setattr(Packed, "block_mask", broken)
    want = hidden_states(model, packed, "dense")
    with caplog.at_level(logging.WARNING, logger="engine"):
        got = hidden_states(model, packed, "flex")
    torch.testing.assert_close(got, want)
    reason = "RuntimeError: flex kernels unavailable here"
    assert attention_used() == f"dense (flex failed: {reason})"
    assert reason in caplog.text and "dense N x N mask" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine"):
        hidden_states(model, packed, "flex")  # the same device and mode: not retried, still recorded
    assert attention_used() == f"dense (flex failed: {reason})" and caplog.text == ""
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="engine"):
        hidden_states(model, packed, "flex")  # another mode (no grad) tries flex on its own, and says so
    assert reason in caplog.text and "no grad" in caplog.text


def test_a_flex_backward_failure_is_caught_before_the_step(tiny_tokenizer, monkeypatch, caplog):
    """With gradients on, the first flex call per device runs a forward + backward probe: a backward that fails
    (after a forward that works) sends the student's pass to the dense mask, logged and recorded, before any
    training step's backward could fail; the probe runs once per device, never without gradients."""
    model = _lora_model(len(tiny_tokenizer))
    examples = [make_example(tiny_tokenizer, p, s) for p, s in zip(PROBLEMS, SOLUTIONS)]
    packed = pack([student_tree(ex, r) for ex, r in zip(examples, _rollouts(2, seed=4))])
    monkeypatch.setattr(scoring, "_flex_failures", {})
    monkeypatch.setattr(scoring, "_flex_probed", set())
    calls = []
    reason = "RuntimeError: no FlexAttention backward for this head size"
    monkeypatch.setattr(scoring, "flex_backward_failure", lambda m, d: calls.append(d) or reason)
    want = hidden_states(model, packed, "dense")
    with caplog.at_level(logging.WARNING, logger="engine"):
        got = hidden_states(model, packed, "flex")
        hidden_states(model, packed, "flex")
    torch.testing.assert_close(got, want)
    assert attention_used() == f"dense (flex failed: {reason})" and len(calls) == 1
    assert caplog.text.count(reason) == 1 and "forward + backward probe" in caplog.text
    with torch.no_grad():
        hidden_states(model, packed, "flex")  # the teacher's no-grad pass: no probe, flex on its own
    assert len(calls) == 1 and attention_used() == "flex"


def test_the_flex_backward_probe_leaves_parameter_gradients_alone(tiny_tokenizer):
    model = _lora_model(len(tiny_tokenizer))
    why = scoring.flex_backward_failure(model, torch.device("cpu"))
    assert why is None or isinstance(why, str) and why  # CPU: whatever this torch supports, said in one line
    assert all(p.grad is None for p in model.parameters())
