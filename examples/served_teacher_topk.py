"""A trainer whose teacher is served elsewhere: only its top-k token ids and log-probs per position arrive.

    python examples/served_teacher_topk.py --tiny --steps 2                             # a teacher process
    python examples/served_teacher_topk.py --tiny --write-teacher-topk topk.pt          # an offline scoring job
    python examples/served_teacher_topk.py --tiny --teacher-topk topk.pt --steps 2      # ... and training from it
    python examples/served_teacher_topk.py --student Qwen/Qwen3-0.6B --teacher Qwen/Qwen3-1.7B --top-k 64

This process holds the student only. Its teacher is either a separate process - a stand-in for an inference
server asked for ``prompt_logprobs=k`` (vLLM, SGLang), as verl's, NeMo RL's and TRL's server trainers do - that
answers each batch of token ids with the K most likely next tokens and their log-probabilities at every position,
or a file of those written once by an offline scoring job. ``fused_linear_kl_topk`` then takes the student's final
hidden states and LM head (its log-softmax over V is never materialised) with the teacher's [B, L, K] ids and
log-probs: forward KL over the K entries plus one tail bucket for the remaining mass, OPSD's pointwise clip.

The teacher scores at the same temperature as the loss, over the student's vocabulary: a teacher whose head is
padded beyond it (Qwen checkpoints of different sizes) drops the padded rows before its log-softmax, so every id
it returns is a valid student token. As everywhere, the hidden state at position t predicts token t + 1: the
hidden states and the teacher's top-k of positions [0, L-1) go with the labels of positions [1, L).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys

import torch
from common import PROBLEMS, final_hidden, load_student, load_teacher, make_batch, parse, parser

from atesd.kernels import fused_linear_kl_topk


@torch.no_grad()
def teacher_topk(teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int, vocab_size: int,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k ids (int32) and log-probs (fp32) [B, L, K] at every position, over the first
    ``vocab_size`` entries of its vocabulary (what a server returns for prompt_logprobs=k)."""
    logits = teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logprobs, ids = (logits[..., :vocab_size].float() / temperature).log_softmax(-1).topk(k, dim=-1)
    return ids.to(torch.int32), logprobs


# ----------------------------------------------------------------------------------------------------------------
# the teacher's side: a process answering requests on its stdin / stdout


def _send(stream, obj: dict) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


def _receive(stream) -> dict | None:
    header = stream.read(8)
    if len(header) < 8:
        return None
    return torch.load(io.BytesIO(stream.read(int.from_bytes(header, "little"))), weights_only=True)


def serve(args) -> None:
    """The teacher process: read {input_ids, attention_mask}, answer {ids, logprobs}, until stdin closes."""
    replies = sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed here must not corrupt the replies
    teacher = load_teacher(args)
    while (request := _receive(sys.stdin.buffer)) is not None:
        ids, logprobs = teacher_topk(teacher, request["input_ids"], request["attention_mask"], args.top_k,
                                     args.vocab_size, args.temperature)
        _send(replies, {"ids": ids, "logprobs": logprobs})


class TeacherProcess:
    """Client of :func:`serve` running in a child process (this script with ``--serve-teacher``)."""

    def __init__(self, args, vocab_size: int) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--serve-teacher", "--vocab-size", str(vocab_size),
               "--top-k", str(args.top_k), "--temperature", str(args.temperature)]
        cmd += ["--tiny"] if args.tiny else ["--student", args.student] + (["--teacher", args.teacher]
                                                                           if args.teacher else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def topk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _send(self.proc.stdin, {"input_ids": input_ids, "attention_mask": attention_mask})
        reply = _receive(self.proc.stdout)
        if reply is None:
            raise RuntimeError(f"the teacher process exited (code {self.proc.wait()}); its error is above")
        return reply["ids"], reply["logprobs"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class TeacherFile:
    """Top-k written by ``--write-teacher-topk`` for the batch this example trains on."""

    def __init__(self, path: str) -> None:
        self.saved = torch.load(path, weights_only=True)

    def topk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.equal(self.saved["input_ids"], input_ids):
            raise ValueError("--teacher-topk: the file scores other token ids than this batch (write it again)")
        return self.saved["ids"], self.saved["logprobs"]

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------------
# the trainer's side


def main() -> float:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--top-k", type=int, default=32, help="teacher entries per position (verl: 32, NeMo RL: 64)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--clip", type=float, default=0.05, help="pointwise clip of each entry's term (OPSD's)")
    p.add_argument("--teacher-topk", metavar="FILE", help="train from top-k written by --write-teacher-topk")
    p.add_argument("--write-teacher-topk", metavar="FILE", help="score the batch with the teacher, write, exit")
    p.add_argument("--serve-teacher", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    args = parse(p)
    if args.serve_teacher:
        serve(args)
        return 0.0
    student, tokenizer = load_student(args)
    head = student.get_output_embeddings().weight  # [V, H]
    batch = make_batch(tokenizer, PROBLEMS)
    if args.write_teacher_topk:  # the offline job: the teacher in this process, once
        ids, logprobs = teacher_topk(load_teacher(args), batch["input_ids"], batch["attention_mask"], args.top_k,
                                     head.shape[0], args.temperature)
        torch.save({"input_ids": batch["input_ids"], "ids": ids, "logprobs": logprobs}, args.write_teacher_topk)
        print(f"wrote the teacher's top-{args.top_k} of {ids.shape[0] * ids.shape[1]} positions to "
              f"{args.write_teacher_topk}")
        return 0.0

    source = TeacherFile(args.teacher_topk) if args.teacher_topk else TeacherProcess(args, head.shape[0])
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student.train()
    try:
        for step in range(args.steps):
            ids, logprobs = source.topk(batch["input_ids"], batch["attention_mask"])
            hs = final_hidden(student, batch["input_ids"], batch["attention_mask"])
            loss, stats = fused_linear_kl_topk(
                hs[:, :-1], head, ids[:, :-1], logprobs[:, :-1], labels=batch["labels"][:, 1:],
                temperature=args.temperature, clip=args.clip, beta=0.0, tail=True, return_stats=True,
            )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            counted = batch["labels"][:, 1:] != -100
            print(f"step {step}: loss {loss.item():.4f}, top-{args.top_k} mass: teacher "
                  f"{stats['teacher_topk_mass'][counted].mean():.3f}, student "
                  f"{stats['student_topk_mass'][counted].mean():.3f}")
    finally:
        source.close()
    return loss.item()


if __name__ == "__main__":
    main()
