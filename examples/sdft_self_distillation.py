"""SDFT-style self-distillation with the fused clipped-KL op: one model is both student and teacher.

    python examples/sdft_self_distillation.py --tiny --steps 2
    python examples/sdft_self_distillation.py --student Qwen/Qwen3-0.6B --steps 100

Like OPSD but off-policy: the tokens are the dataset's answers, not the student's samples. The student scores them
after the problem alone; the teacher (the same weights, no gradient) scores the same tokens after the problem with
the reference solution in its context. Both sequences end with the answer (left padding), so the hidden states
that predict the answer tokens are the last K positions but one of each, whatever the two prompt lengths.
"""

from __future__ import annotations

import torch
from common import PROBLEMS, final_hidden, load, parse, parser

from atesd.kernels import fused_linear_kl


def right_aligned(tokenizer, prompts: list[str], answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt + answer ids and attention mask [B, L]: every sequence ends with its answer."""
    seqs = [tokenizer(p + "\n", add_special_tokens=False)["input_ids"] + a for p, a in zip(prompts, answers)]
    width = max(map(len, seqs))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def main() -> float:
    args = parse(parser(__doc__.splitlines()[0]))
    model, _, tokenizer = load(args)  # one model: the second one is not used
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    questions = [q for q, _ in PROBLEMS]
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for _, a in PROBLEMS]
    with_reference = [f"{q}\nReference solution: {a}\nNow solve it yourself." for q, a in PROBLEMS]
    k = max(map(len, answers))
    # labels of the last k positions: the answer tokens, -100 where a shorter answer's row still holds prompt
    labels = torch.tensor([[-100] * (k - len(a)) + a for a in answers])
    model.train()
    for step in range(args.steps):
        student_ids, student_mask = right_aligned(tokenizer, questions, answers)
        teacher_ids, teacher_mask = right_aligned(tokenizer, with_reference, answers)
        hs = final_hidden(model, student_ids, student_mask)[:, -k - 1 : -1]
        with torch.no_grad():  # the teacher: the same model, reference in context, no gradient
            ht = final_hidden(model, teacher_ids, teacher_mask)[:, -k - 1 : -1]
        head = model.get_output_embeddings().weight
        loss = fused_linear_kl(hs, ht, head, labels=labels, temperature=1.1, clip=0.05, beta=0.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    main()
