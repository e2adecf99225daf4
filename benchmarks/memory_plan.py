"""Per-GPU memory plan of data-parallel OPSD training, COMPUTED from the model shapes (not measured): the tables of
docs/distributed.md.

    python benchmarks/memory_plan.py            # markdown tables for Qwen3-1.7B/4B/8B on 1, 2, 4, 8 GPUs

The OPSD recipe: LoRA r=64 on q,k,v,o,gate,up,down (fp32 adapter, AdamW), bf16 base, 32 prompts per step, G=1,
1024-token rollouts, micro-batches of 4 problems, gradient checkpointing (one decoder layer recomputed at a time).
Assumed lengths: student prompt 256 tokens, reference solution 2048 tokens (OPSD allows 8192; the teacher pass
grows linearly with it). Rollouts by the static decoder (the default), which decodes with bf16 copies of every
projection with LoRA merged in: held for the whole run by one process (they are counted in the training phase too),
built and freed within each rollout under --fsdp lora|full. Not counted: the CUDA context and allocator slack
(~1-2 GiB), the rollout's logits (B x V fp32, < 0.1 GiB) and Python-side buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
V = 151936


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int = 128
    tied: bool = True

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def projection_params(self) -> int:
        """The seven LoRA-targeted linear layers of every decoder layer (what the static decoder merges)."""
        h = self.hidden
        return self.layers * (h * self.q + 2 * h * self.kv + self.q * h + 3 * h * self.inter)

    def layer_params(self) -> int:
        h = self.hidden
        return h * self.q + 2 * h * self.kv + self.q * h + 3 * h * self.inter + 2 * h + 2 * self.head_dim

    def params(self) -> int:
        return self.layers * self.layer_params() + V * self.hidden * (1 if self.tied else 2) + self.hidden

    def lora_params(self, r: int = 64) -> int:
        h, i = self.hidden, self.inter
        per_layer = r * ((h + self.q) + 2 * (h + self.kv) + (self.q + h) + 3 * (h + i))
        return self.layers * per_layer

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv * 2  # K and V, bf16

    def layer_activations(self, tokens: int) -> int:
        """bf16 tensors one decoder layer keeps for its backward (recomputed under checkpointing): norm outputs,
        q/k/v, attention output, o_proj input, gate/up/act/down input."""
        return tokens * (3 * self.hidden + 2 * self.q + 2 * self.kv + 4 * self.inter) * 2

    def layer_working_set(self, tokens: int) -> int:
        """bf16 tensors alive inside one decoder layer's no-grad forward (the teacher pass)."""
        return tokens * (2 * self.hidden + self.q + 2 * self.kv + 2 * self.inter) * 2


MODELS = [
    Shape("Qwen3-1.7B", 2048, 6144, 28, 16, 8, tied=True),
    Shape("Qwen3-4B", 2560, 9728, 36, 32, 8, tied=True),
    Shape("Qwen3-8B", 4096, 12288, 36, 32, 8, tied=False),
]
BATCH, MICRO, PROMPT, ROLLOUT, REFERENCE = 32, 4, 256, 1024, 2048


def plan(m: Shape, gpus: int, mode: str) -> dict[str, float]:
    """GiB per GPU. mode 'lora': base replicated, adapter sharded; 'full': base sharded too."""
    p, pl = m.params(), m.lora_params()
    head = V * m.hidden * 2
    out: dict[str, float] = {}
    if mode == "full" and gpus > 1:
        replicated = head if m.tied else 0  # a tied head/embedding stays replicated
        out["base weights"] = (replicated + (2 * p - replicated) / gpus) / GIB
    else:
        out["base weights"] = 2 * p / GIB
    # adapter fp32 weight + AdamW m, v (sharded), its gradient (sharded) and the unsharded gradient that
    # accumulates over a rank's micro-batches before the reduce-scatter
    out["LoRA + AdamW"] = (16 * pl if gpus == 1 else 16 * pl / gpus + 4 * pl) / GIB
    # rollout phase: every rank's share of the prompts, prompt + rollout tokens of KV cache
    rollout_tokens = BATCH // gpus * (PROMPT + ROLLOUT)
    out["rollout KV cache"] = rollout_tokens * m.kv_bytes_per_token() / GIB
    out["whole model gathered for rollouts"] = (2 * p / GIB - out["base weights"]) if mode == "full" else 0.0
    merged = 2 * m.projection_params() / GIB  # bf16
    out["static decoder's merged projections"] = merged
    held = merged if gpus == 1 else 0.0  # one process keeps its decoder; under FSDP it lives within a rollout
    # training phase, one micro-batch of 4 problems
    student = MICRO * (PROMPT + ROLLOUT)
    scored = MICRO * ROLLOUT
    teacher = MICRO * (PROMPT + REFERENCE + 64 + ROLLOUT + 32)
    out["activations (checkpointed student pass)"] = (
        m.layers * student * m.hidden * 2 + m.layer_activations(student) + 2 * scored * m.hidden * 2
    ) / GIB
    out["teacher pass (transient) + kept teacher states"] = (
        teacher * m.hidden * 2 + m.layer_working_set(teacher) + scored * m.hidden * 2
    ) / GIB
    # the fused op: fp32 grad of the student hidden states + O(N) partials + the backward's bf16 dz workspace
    # (ATESD_TRITON_BWD_WORKSPACE_MIB, 512 MiB by default: at most 1728 rows of V)
    workspace_rows = min(scored, 512 * 2**20 // (V * 2) // 64 * 64)
    out["fused KL op extra"] = (scored * m.hidden * 4 + scored * 64 * 4 * 4 + workspace_rows * V * 2) / GIB
    layer = 2 * m.layer_params()
    out["FSDP gathers in training (2 layers + head)"] = (
        (2 * layer + (0 if m.tied else head)) / GIB if mode == "full" and gpus > 1 else 0.0
    )
    resident = out["base weights"] + out["LoRA + AdamW"]
    rollout_peak = resident + out["rollout KV cache"] + out["whole model gathered for rollouts"] + merged
    train_peak = (
        resident
        + held
        + max(out["activations (checkpointed student pass)"], out["teacher pass (transient) + kept teacher states"])
        + out["fused KL op extra"]
        + out["FSDP gathers in training (2 layers + head)"]
    )
    out["peak, rollout phase"] = rollout_peak
    out["peak, training phase"] = train_peak
    out["peak"] = max(rollout_peak, train_peak)
    return out


def tables() -> str:
    lines = []
    for m in MODELS:
        lines.append(
            f"\n#### {m.name} ({m.params() / 1e9:.2f}B parameters, LoRA r=64: {m.lora_params() / 1e6:.1f}M, "
            f"{'tied' if m.tied else 'untied'} head)\n"
        )
        cols = [(g, mode) for g in (1, 2, 4, 8) for mode in (("lora",) if g == 1 else ("lora", "full"))]
        heads = [("1 GPU" if g == 1 else f"{g} GPUs, {mode}") for g, mode in cols]
        lines.append("| GiB per GPU | " + " | ".join(heads) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        rows = [plan(m, g, mode) for g, mode in cols]
        for key in rows[0]:
            cells = " | ".join(f"**{r[key]:.1f}**" if key == "peak" else f"{r[key]:.2f}" for r in rows)
            lines.append(f"| {key} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(tables())
