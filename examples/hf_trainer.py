"""Hugging Face ``Trainer`` with the fused clipped-KL op as its loss: override ``compute_loss``.

    python examples/hf_trainer.py --tiny --steps 2
    python examples/hf_trainer.py --student Qwen/Qwen3-0.6B --teacher Qwen/Qwen3-1.7B --steps 100

``compute_loss`` calls ``model`` (the wrapped model Trainer passes in) for the hidden states, so DDP's / FSDP's
hooks run; the LM head is read from the unwrapped model. ``num_items_in_batch`` (HF's count of counted tokens over
all gradient-accumulation micro-batches) is passed straight to the op, whose 'mean' then divides by it: the
accumulated gradient equals that of one big batch.
"""

from __future__ import annotations

import tempfile

import torch
from common import PROBLEMS, final_hidden, load, make_batch, parse, parser
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from atesd.kernels import fused_linear_kl


class Rows(Dataset):
    """Pre-tokenised, equally padded rows (so the default collator only stacks them)."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


class DistillationTrainer(Trainer):
    def __init__(self, *args, teacher, temperature: float = 1.0, clip: float | None = None, beta: float = 0.0,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher, self.temperature, self.clip, self.beta = teacher, temperature, clip, beta

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        hs = final_hidden(model, inputs["input_ids"], inputs["attention_mask"])  # through the wrapper
        with torch.no_grad():
            ht = final_hidden(self.teacher, inputs["input_ids"], inputs["attention_mask"])
        student_head = self.accelerator.unwrap_model(model).get_output_embeddings()
        loss = fused_linear_kl(
            hs[:, :-1], ht[:, :-1], student_head.weight,
            teacher_weight=self.teacher.get_output_embeddings().weight,
            labels=labels[:, 1:], num_items_in_batch=num_items_in_batch,
            temperature=self.temperature, clip=self.clip, beta=self.beta,
        )
        return (loss, {"loss": loss}) if return_outputs else loss


def main() -> float:
    args = parse(parser(__doc__.splitlines()[0]))
    student, teacher, tokenizer = load(args)
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=args.output_dir or tmp, max_steps=args.steps, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1, save_strategy="no",
            report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        )
        rows = Rows(make_batch(tokenizer, PROBLEMS))
        trainer = DistillationTrainer(model=student, args=training_args, train_dataset=rows, teacher=teacher)
        result = trainer.train()
    print(f"trained {result.global_step} steps: loss {result.training_loss:.4f}")
    return result.training_loss


if __name__ == "__main__":
    main()
