"""TRL's ``DistillationTrainer`` (trl >= 1.x, on-policy distillation) with the fused clipped-KL op as its loss.

    python examples/trl_distillation.py --tiny --steps 2
    python examples/trl_distillation.py --student Qwen/Qwen3-0.6B --teacher Qwen/Qwen3-1.7B --steps 100

TRL samples completions from the student and computes its generalized JSD (``beta``) from both models' final
hidden states in ``_compute_loss``, which runs inside the wrapped student's forward (``_forward_redirection``), so
DDP / FSDP see it. The override keeps all of that and swaps the divergence: the same hidden states go to
``fused_linear_kl`` with OPSD's pointwise clip, and TRL's own ``num_items_in_batch`` normaliser.
"""

from __future__ import annotations

import tempfile

import torch
from common import PROBLEMS, load, parse, parser
from datasets import Dataset
from trl import DistillationConfig
from trl import DistillationTrainer as TRLDistillationTrainer

from atesd.kernels import fused_linear_kl


class FusedDistillationTrainer(TRLDistillationTrainer):
    clip: float | None = 0.05  # OPSD's pointwise clip; None: TRL's unclipped divergence

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        n_completion = inputs["completion_ids"].size(1)
        # hidden states aligned with the completion tokens (TRL's helper does the shift)
        hs = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, n_completion)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            ht = self._forward_redirection(self.teacher_model, teacher, self._get_last_hidden_state, teacher,
                                           input_ids, attention_mask, n_completion)
        loss, stats = fused_linear_kl(
            hs, ht, unwrapped_student.get_output_embeddings().weight,
            teacher_weight=teacher.get_output_embeddings().weight,
            mask=loss_mask.bool(), num_items_in_batch=num_items_in_batch,
            temperature=self.temperature, clip=self.clip, beta=self.beta, return_stats=True,
        )
        # TRL logs the student entropy from these two sums
        return loss, stats["student_entropy"].sum().detach(), loss_mask.sum()


def main() -> float:
    args = parse(parser(__doc__.splitlines()[0]))
    student, teacher, tokenizer = load(args, teacher_padding=0)  # TRL checks that both vocabularies are equal
    dataset = Dataset.from_dict({"prompt": [question for question, _ in PROBLEMS]})
    with tempfile.TemporaryDirectory() as tmp:
        config = DistillationConfig(
            output_dir=args.output_dir or tmp, max_steps=args.steps, per_device_train_batch_size=2,
            max_completion_length=8 if args.tiny else 256, learning_rate=1e-3, beta=0.0, temperature=1.0,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
        )
        trainer = FusedDistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                           processing_class=tokenizer)
        result = trainer.train()
    print(f"trained {result.global_step} steps: loss {result.training_loss:.4f}")
    return result.training_loss


if __name__ == "__main__":
    main()
