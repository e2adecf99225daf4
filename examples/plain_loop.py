"""Plain PyTorch loop: distil a teacher into a student on given answers with the fused clipped-KL op.

    python examples/plain_loop.py --tiny --steps 2
    python examples/plain_loop.py --student Qwen/Qwen3-0.6B --teacher Qwen/Qwen3-1.7B --steps 100

The hidden state at position t predicts token t + 1, so the hidden states of positions [0, L-1) go with the
labels of positions [1, L): ``hidden[:, :-1]`` with ``labels[:, 1:]`` (the op never shifts). Prompt and padding
positions carry label -100 and do not count.
"""

from __future__ import annotations

import torch
from common import PROBLEMS, final_hidden, load, make_batch, parse, parser

from atesd.kernels import fused_linear_kl


def main() -> float:
    args = parse(parser(__doc__.splitlines()[0]))
    student, teacher, tokenizer = load(args)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student.train()
    for step in range(args.steps):
        batch = make_batch(tokenizer, PROBLEMS)
        hs = final_hidden(student, batch["input_ids"], batch["attention_mask"])
        with torch.no_grad():
            ht = final_hidden(teacher, batch["input_ids"], batch["attention_mask"])
        loss = fused_linear_kl(
            hs[:, :-1], ht[:, :-1], student.get_output_embeddings().weight,
            teacher_weight=teacher.get_output_embeddings().weight,  # own width; padded vocabulary rows dropped
            labels=batch["labels"][:, 1:],
            temperature=1.0, clip=None, beta=0.0,  # forward KL(teacher || student); clip=0.05 for OPSD's
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    main()
