"""Static-cache Qwen3 decoding: the fast rollout path (DESIGN 4.2b), in the spirit of gpt-fast.

The prompt batch is prefilled once by the Hugging Face model (adapter on, exactly as the reference loop in
``engine/hf_rollout.py``), its KV is copied G times into a preallocated cache, and every further token is one call of
:func:`decode_one`: a minimal Qwen3 forward over the HF weights plus on-device sampling. ``torch.compile`` turns
that call into one graph (CUDA graphs on GPU, ``mode="reduce-overhead"``); the plain eager function is the
fallback, chosen by a flag or, logged, when compiling fails. The host looks at the ``done`` flags only every
``check_every`` tokens: then finished rows leave the batch (their cache rows are compacted away), so compute
follows the live rows.

Why our own decode step rather than the HF model over a ``StaticCache``: the step is a pure function of a few
tensors we own (cache, per-row first column, one write column), so dropping finished rows is an index on our
buffers; there is no per-token mask construction, output dataclass or peft dispatch; q and k share one RMSNorm
and one RoPE call, and the graph compiles without breaks (measured: ``benchmarks/RESULTS.md`` section 10).

LoRA: ``merge=True`` (the default) runs each projection group with one fused copy of the merged weights,
``[W_q+dW_q; W_k+dW_k; W_v+dW_v]``, ``[W_gate+dW; W_up+dW]``, ``W_o+dW``, ``W_down+dW``, recomputed in place
before every rollout; ``merge=False`` reads the model's own weights and adds ``scaling * B(A x)`` per adapter. The
model's parameters are never written, so nothing has to be restored after a rollout.

FSDP (``--fsdp lora|full`` under torchrun): outside ``DataParallel.gathered()`` the sharded weights are DTensors,
inside it they are whole plain tensors (FSDP2 swaps its unsharded parameters in), at addresses that change with
every gather. So over an FSDP model the decoder is *transient*: :class:`StaticRollout` builds it at the start of
each rollout from the gathered weights (references to them, LoRA merged from the gathered adapter), and drops it
at the end, merged copies, KV cache and RoPE table with it; between rollouts it holds no tensor. Asked to decode
outside ``gathered()`` it refuses in one line rather than read shards.

Sampling is the reference loop's own draw (``engine/sampling.py``), moved inside the step: each original row
(prompt b, sample g) owns a stream of float64 uniforms ``u[t]`` drawn up front from the prompt's seed, and token t
is the inverse CDF of the row's filtered distribution (``sampling.next_token``: temperature, top-k, top-p) at
``u[t]``. The step gets ``u[original row, t]`` for its live rows (an on-device gather: compaction keeps every
row on its own stream), so there is no host sync, and the same seeds give the reference loop's rollouts token for
token wherever both compute the same logits (fp32: equal to ~1e-5, so only a ``u`` within that of a CDF step can
flip a draw).
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from atesd.engine.models import causal_lm
from atesd.engine.sampling import RolloutLoop, cut_at_eos, left_pad, next_token, row_uniforms

log = logging.getLogger("engine")

ROPE_TYPES = ("default", "linear", "yarn", "llama3")  # position tables that do not depend on the length seen


# --------------------------------------------------------------------------------------------------- weights
def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover (a torch without distributed)
        return False
    return isinstance(t, DTensor)


def _whole(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` detached, refusing a shard: the decoder reads whole weights only (under FSDP, inside ``gathered()``)."""
    if t is not None and _is_dtensor(t):
        raise RuntimeError(
            "the static decoder reads whole weights, and this model's are FSDP shards: decode inside "
            "DataParallel.gathered() (engine/distributed.py), where every FSDP unit is unsharded"
        )
    return None if t is None else t.detach()


def fsdp_managed(model) -> bool:
    """True when FSDP2 (``fully_shard``) manages some of the model's modules: its weights are whole only inside
    ``DataParallel.gathered()``, at new addresses each time."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _lora_parts(module) -> tuple[nn.Linear, list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """(base nn.Linear, [(A [r, in], B [out, r], scaling)] of the adapters acting now) of a projection."""
    if not hasattr(module, "get_base_layer"):  # a plain nn.Linear
        return module, []
    base = module.get_base_layer()
    if module.disable_adapters or module.merged:  # the base weight already is the effective one
        return base, []
    parts = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(name, False):
            raise ValueError(f"adapter {name!r} is a LoRA variant or has lora_bias (only plain LoRA is supported)")
        if getattr(module, "fan_in_fan_out", False):
            raise ValueError("fan_in_fan_out LoRA layers are not supported")
        parts.append((module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name])))
    return base, parts


def merged_weight(module) -> torch.Tensor:
    """The weight a projection acts with now: base + sum of scaling * B @ A, added in fp32 and rounded once."""
    base, parts = _lora_parts(module)
    if not parts:
        return _whole(base.weight)
    w = _whole(base.weight).float()
    for a, b, s in parts:
        w = w + (_whole(b).float() @ _whole(a).float()) * s
    return w.to(base.weight.dtype)


class Projections(nn.Module):
    """Projections of one input, concatenated: ``x [n, in] -> [n, sum(out)]``.

    ``merge=True``: one fused buffer of the merged weights (and biases), refreshed in place by :meth:`refresh`,
    so its address stays fixed for CUDA graphs. ``merge=False``: the model's own weights (references) and, per
    adapter, ``+ scaling * (x A^T) B^T`` computed in the adapter's dtype as peft does.
    """

    def __init__(self, modules: list, merge: bool) -> None:
        super().__init__()
        self.sources = modules  # the model's modules (a plain list: not registered, never moved from here)
        bases = [_lora_parts(m)[0] for m in modules]
        self.sizes = [b.out_features for b in bases]
        if any(b.bias is not None for b in bases) and not all(b.bias is not None for b in bases):
            raise ValueError("projections of one group must all have a bias or none")
        self.merge = merge
        self.adapters: list[list[float]] = []  # per projection, the scalings of its adapters
        if merge:
            w0 = bases[0].weight
            self.register_buffer("weight", w0.new_empty(sum(self.sizes), w0.shape[1]), persistent=False)
            bias = w0.new_empty(sum(self.sizes)) if bases[0].bias is not None else None
            self.register_buffer("bias", bias, persistent=False)
            self.refresh()
            return
        for i, m in enumerate(modules):
            base, loras = _lora_parts(m)
            self.register_buffer(f"weight{i}", _whole(base.weight), persistent=False)
            self.register_buffer(f"bias{i}", _whole(base.bias), persistent=False)
            for j, (a, b, _) in enumerate(loras):
                self.register_buffer(f"lora_a{i}_{j}", _whole(a), persistent=False)
                self.register_buffer(f"lora_b{i}_{j}", _whole(b), persistent=False)
            self.adapters.append([s for _, _, s in loras])

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the fused merged weight in place from the model (a no-op for references)."""
        if not self.merge:
            return
        lo = 0
        for m, n in zip(self.sources, self.sizes):
            base = _lora_parts(m)[0]
            self.weight[lo : lo + n].copy_(merged_weight(m))
            if self.bias is not None:
                self.bias[lo : lo + n].copy_(_whole(base.bias))
            lo += n

    def signature(self) -> tuple:
        """What the model's modules hold now: storage, dtype, adapters, scalings (a change means rebuild)."""
        sig = []
        for m in self.sources:
            base, loras = _lora_parts(m)
            adapters = tuple((a.data_ptr(), b.data_ptr(), s) for a, b, s in loras)
            sig.append((base.weight.data_ptr(), base.weight.dtype, base.weight.device, adapters))
        return tuple(sig)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merge:
            return F.linear(x, self.weight, self.bias)
        outs = []
        for i, scalings in enumerate(self.adapters):
            y = F.linear(x, getattr(self, f"weight{i}"), getattr(self, f"bias{i}"))
            if scalings:
                out = y
                for j, s in enumerate(scalings):
                    a, b = getattr(self, f"lora_a{i}_{j}"), getattr(self, f"lora_b{i}_{j}")
                    out = out + F.linear(F.linear(x.to(a.dtype), a), b) * s
                y = out.to(y.dtype)
            outs.append(y)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Qwen3RMSNorm over the last dim: normalised in fp32, scaled in the input dtype (HF's rounding).

    fp32 takes torch's ``F.rms_norm`` (the same arithmetic, fewer dispatches); ``weight=None`` leaves the scaling to
    the caller.
    """
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else weight * y


class Layer(nn.Module):
    """One Qwen3 decoder layer for one new token per row, over its slice of the static KV cache."""

    def __init__(self, hf_layer, config, merge: bool) -> None:
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.qkv = Projections([attn.q_proj, attn.k_proj, attn.v_proj], merge)
        self.o = Projections([attn.o_proj], merge)
        self.gate_up = Projections([mlp.gate_proj, mlp.up_proj], merge)
        self.down = Projections([mlp.down_proj], merge)
        self.register_buffer("input_norm", _whole(hf_layer.input_layernorm.weight), persistent=False)
        self.register_buffer("post_norm", _whole(hf_layer.post_attention_layernorm.weight), persistent=False)
        # the model's own modules, held outside nn.Module registration (never moved, cast or traversed from here)
        self.__dict__["sources"] = (attn.q_norm, attn.k_norm)
        self.eps = config.rms_norm_eps
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        d = self.head_dim
        self.register_buffer("qk_norm", attn.q_norm.weight.new_empty(self.heads + self.kv_heads, d), persistent=False)
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)
        self.refresh()

    def projections(self) -> list[Projections]:
        return [self.qkv, self.o, self.gate_up, self.down]

    @torch.no_grad()
    def refresh(self) -> None:
        # q and k share one RMSNorm call: the per-head-dim weights of q_norm and k_norm stacked per head
        q_norm, k_norm = self.sources
        self.qk_norm[: self.heads].copy_(_whole(q_norm.weight).expand(self.heads, -1))
        self.qk_norm[self.heads :].copy_(_whole(k_norm.weight).expand(self.kv_heads, -1))
        for p in self.projections():
            p.refresh()

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        col: torch.Tensor,
        mask: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """x [n, H], rope [n, 2, D] (cos; sin with its first half negated), col [1] (the cache column written),
        mask [n, 1, 1, W] bool (the columns each row attends to), this layer's caches [rows >= n, kv_heads,
        columns > W, D] (``self.k_cache`` / ``self.v_cache``, passed in so a compiled graph sees their sizes as
        dynamic: a cache that grows is not a recompile) -> [n, H]."""
        n, h, kv, d = x.shape[0], self.heads, self.kv_heads, self.head_dim
        qkv = self.qkv(rms_norm(x, self.input_norm, self.eps)).view(n, h + 2 * kv, d)
        qk = rms_norm(qkv[:, : h + kv], None, self.eps) * self.qk_norm
        # RoPE: x cos + rotate_half(x) sin, with rotate_half(x) sin = roll(x, D/2) * [-sin_1, sin_2] (exactly)
        qk = qk * rope[:, :1] + qk.roll(d // 2, -1) * rope[:, 1:]
        k_cache[:n].index_copy_(2, col, qk[:, h:, None])
        v_cache[:n].index_copy_(2, col, qkv[:, h + kv :, None])
        window = mask.shape[-1]
        # GQA without repeat_kv: the query heads of one KV head are that head's "query positions" (HF's pack_gqa)
        o = F.scaled_dot_product_attention(
            qk[:, :h].view(n, kv, h // kv, d),
            k_cache[:n, :, :window],
            v_cache[:n, :, :window],
            attn_mask=mask,
            scale=self.scaling,
        )
        x = x + self.o(o.reshape(n, h * d))
        gate, up = self.gate_up(rms_norm(x, self.post_norm, self.eps)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def unsupported(model) -> str | None:
    """Why the static decoder cannot run this model (None: it can)."""
    lm = causal_lm(model)
    cfg = getattr(lm, "config", None)
    if getattr(cfg, "model_type", None) != "qwen3":
        return f"model type {getattr(cfg, 'model_type', type(lm).__name__)!r} (the static decoder implements qwen3)"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
        return "sliding-window layers"
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in ROPE_TYPES:
        return f"rope type {rope!r} (its position tables depend on the length seen)"
    if not fsdp_managed(model) and any(_is_dtensor(p) for p in lm.parameters()):
        return "DTensor weights not managed by FSDP2 (tensor parallelism)"
    try:
        for layer in lm.get_decoder().layers:
            a, m = layer.self_attn, layer.mlp
            for proj in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
                _lora_parts(proj)
    except ValueError as e:
        return str(e)
    return None


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache per row and column the static decoder would hold for ``model`` (keys and values, every
    layer, in the embeddings' dtype): :meth:`Qwen3Decoder.cache_bytes` without building the decoder."""
    lm = causal_lm(model)
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_layer = 2 * cfg.num_key_value_heads * head_dim
    return per_layer * cfg.num_hidden_layers * lm.get_input_embeddings().weight.element_size()


class Qwen3Decoder(nn.Module):
    """A one-token-per-row Qwen3 forward over a static KV cache, reading the weights of an HF (peft) Qwen3."""

    def __init__(self, model, merge: bool = True) -> None:
        super().__init__()
        reason = unsupported(model)
        if reason:
            raise ValueError(f"the static decoder does not support this model: {reason}")
        self.merge = merge
        lm = causal_lm(model)
        body, cfg = lm.get_decoder(), lm.config
        self.layers = nn.ModuleList([Layer(layer, cfg, merge) for layer in body.layers])
        self.register_buffer("embed", _whole(body.embed_tokens.weight), persistent=False)
        self.register_buffer("norm", _whole(body.norm.weight), persistent=False)
        self.register_buffer("head", _whole(lm.get_output_embeddings().weight), persistent=False)
        self.__dict__["rotary"] = body.rotary_emb  # the model's module, unregistered (see Layer)
        self.register_buffer("rope", None, persistent=False)  # [columns, 2, D]: cos, signed sin
        self.register_buffer("columns", None, persistent=False)  # arange(columns)
        self.eps = cfg.rms_norm_eps
        self._signature = self.signature()

    def signature(self) -> tuple:
        return tuple(p.signature() for layer in self.layers for p in layer.projections())

    def stale(self) -> bool:
        """True when the model's weights moved or its adapters changed since this decoder was built."""
        return self.signature() != self._signature

    @torch.no_grad()
    def refresh(self) -> None:
        """Bring merged copies up to date with the adapter (before every rollout)."""
        for layer in self.layers:
            layer.refresh()

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def cache_shape(self) -> tuple[int, int]:
        """(rows, columns) of the allocated KV cache ((0, 0) before the first rollout)."""
        k = self.layers[0].k_cache
        return (0, 0) if k is None else (k.shape[0], k.shape[2])

    def cache_bytes(self, rows: int, columns: int) -> int:
        """Bytes of a KV cache of ``rows`` x ``columns`` (keys and values, every layer)."""
        per_token = sum(2 * layer.kv_heads * layer.head_dim for layer in self.layers) * self.embed.element_size()
        return per_token * rows * columns

    @torch.no_grad()
    def reserve(self, rows: int, columns: int, multiple: int = 64) -> bool:
        """Allocate (grow only) the KV cache [rows, kv_heads, columns, head_dim] per layer and the RoPE table;
        True when the buffers moved (CUDA graphs re-record)."""
        have_rows, have_cols = self.cache_shape()
        if rows <= have_rows and columns <= have_cols:
            return False
        rows, columns = max(rows, have_rows), max(math.ceil(columns / multiple) * multiple, have_cols)
        dtype, device = self.embed.dtype, self.device
        for layer in self.layers:
            shape = (rows, layer.kv_heads, columns, layer.head_dim)
            layer.k_cache = layer.v_cache = None  # free the old ones first
            layer.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            layer.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.columns = torch.arange(columns, device=device)
        cos, sin = self.rotary(self.embed[:1], self.columns[None])  # HF's own tables: [1, columns, D]
        half = cos.shape[-1] // 2
        sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        self.rope = torch.stack([cos[0], sin], dim=1).contiguous()
        return True

    @torch.no_grad()
    def load_prefill(self, cache, repeats: int, width: int) -> None:
        """Copy an HF prefill cache ([B, kv_heads, width, D] per layer) into rows [:B*repeats], each prompt's KV
        repeated ``repeats`` times (row b*repeats+g holds prompt b)."""
        for i, layer in enumerate(self.layers):
            keys, values = _layer_kv(cache, i)
            b = keys.shape[0]
            shape = (b, repeats, layer.kv_heads, layer.k_cache.shape[2], layer.head_dim)
            layer.k_cache[: b * repeats].view(shape)[:, :, :, :width].copy_(keys[:, None])
            layer.v_cache[: b * repeats].view(shape)[:, :, :, :width].copy_(values[:, None])

    @torch.no_grad()
    def keep_rows(self, index: torch.Tensor, columns: int) -> None:
        """Compact the cache: rows ``index`` move to rows [:len(index)]; only the first ``columns`` are live."""
        n = index.numel()
        for layer in self.layers:
            for cache in (layer.k_cache, layer.v_cache):
                cache[:n, :, :columns] = cache[index, :, :columns]

    def state(self) -> tuple[torch.Tensor, ...]:
        """The buffers that grow with the cache: (rope, k_cache_0, v_cache_0, k_cache_1, ...)."""
        return (self.rope, *(t for layer in self.layers for t in (layer.k_cache, layer.v_cache)))

    def forward(
        self,
        tok: torch.Tensor,
        col: torch.Tensor,
        start: torch.Tensor,
        cols: torch.Tensor,
        state: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """Logits [n, V] fp32 for tokens tok [n] written at cache column col [1]; row r attends to its columns
        [start[r], col] (left padding before start) at RoPE position col - start[r]. cols = arange(W), W > col:
        the attended window (a tensor, so a compiled graph can take its length as a dynamic size). ``state``:
        :meth:`state` (None: read it here), an argument so that a compiled graph takes the cache sizes as
        dynamic sizes too (module buffers are specialised on: a grown cache would be a recompile)."""
        rope_table, *caches = self.state() if state is None else state
        n, window = tok.shape[0], cols.shape[0]
        rope = rope_table[col - start]
        mask = ((cols >= start[:, None]) & (cols <= col)).view(n, 1, 1, window)
        x = F.embedding(tok, self.embed)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, col, mask, caches[2 * i], caches[2 * i + 1])
        return F.linear(rms_norm(x, self.norm, self.eps), self.head).float()


def _layer_kv(cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i's (keys, values) of an HF cache, across transformers versions."""
    if hasattr(cache, "layers"):
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]  # pragma: no cover (transformers < 4.56)


def decode_one(
    dec: Qwen3Decoder,
    tok: torch.Tensor,
    col: torch.Tensor,
    start: torch.Tensor,
    done: torch.Tensor,
    eos: torch.Tensor,
    u: torch.Tensor | None,
    cols: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    pad_id: int,
    state: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step, the unit ``torch.compile`` sees: (next tokens [n], done [n]); finished rows emit pad.
    ``state``: ``dec.state()`` (the compiled path passes it, see :meth:`Qwen3Decoder.forward`)."""
    nxt = next_token(dec(tok, col, start, cols, state), u, temperature, top_k, top_p).masked_fill(done, pad_id)
    return nxt, done | torch.isin(nxt, eos)


def _describe(e: BaseException) -> str:
    """``Type: first line`` of an exception and of what it wraps (dynamo's BackendCompilerFailed says only which
    backend raised; the cause is the inner exception)."""
    parts = []
    while e is not None and len(parts) < 3:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        parts.append(f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": "))
        e = getattr(e, "inner_exception", None) or e.__cause__
    return " <- ".join(parts)


class CompileFailed(RuntimeError):
    """The compiled step failed; the rollout is redone eagerly with the same seeds."""


class StaticRollout(RolloutLoop):
    """Rollouts over :class:`Qwen3Decoder`, built once per run (``engine/rollout.py: build_rollout``).

    ``compile``: :func:`decode_one` through ``torch.compile`` (``mode="reduce-overhead"``, i.e. CUDA graphs, on
    CUDA); a failure is logged and the run goes on eagerly. ``check_every``: tokens between host looks at the
    ``done`` flags (stop when all rows are done, drop finished rows); a look is a device sync, free on CPU.
    Compiled steps see bucketed shapes (rows: a power of two; attended window: a multiple of ``window_multiple``)
    so few graphs are built; eager steps use exact shapes.

    Over an FSDP model (``transient``) the decoder exists only during a rollout, which must run inside
    ``DataParallel.gathered()``: built from the gathered weights at the start, dropped (:meth:`release`) at the end;
    compiled, its step runs without CUDA graphs, which would be re-recorded for every rollout's new addresses.
    """

    def __init__(
        self,
        model,
        *,
        compile: bool = False,
        merge: bool = True,
        check_every: int | None = None,
        window_multiple: int | None = None,
    ) -> None:
        self.model, self.merge = model, merge
        # over an FSDP model the weights are whole only inside DataParallel.gathered(), at new addresses each time:
        # the decoder is built at the start of every rollout and dropped at its end (module docstring)
        self.transient = fsdp_managed(model)
        if self.transient:
            reason = unsupported(model)
            if reason:
                raise ValueError(f"the static decoder does not support this model: {reason}")
            self.decoder = None
            device = next(model.parameters()).device
        else:
            self.decoder = Qwen3Decoder(model, merge=merge)
            device = self.decoder.device
        cuda = device.type == "cuda"
        self.check_every = check_every or (16 if cuda else 1)
        self.window_multiple = window_multiple or (256 if cuda else 64)
        # CUDA graphs read weights and cache in place; transient weights move every rollout, and every move would
        # record (and keep) new graphs, so a transient decoder compiles its step without them
        self.cuda_graphs = cuda and not self.transient
        self.compiled = None
        if compile:
            if cuda and self.transient:
                log.info(
                    "rollout: FSDP weights are gathered anew for every rollout, so the compiled decode step "
                    "runs without CUDA graphs (they would be re-recorded every rollout)"
                )
            try:
                mode = "reduce-overhead" if self.cuda_graphs else None
                self.compiled = torch.compile(decode_one, mode=mode, fullgraph=True)
            except Exception as e:  # torch.compile unavailable here (platform, Python version): eager, loudly
                log.warning("rollout: torch.compile unavailable (%s: %s); decoding eagerly", type(e).__name__, e)
        kind = "compiled" if self.compiled is not None else "static"
        where = ", weights gathered per rollout" if self.transient else ""
        self.name = f"{kind} ({'merged' if merge else 'unmerged'} LoRA{where})"

    def fits(self, rows: int, columns: int, share: float = 0.25) -> bool:
        """Whether a KV cache of ``rows`` x ``columns`` takes at most ``share`` of the memory free now (the cache
        already held counts as free). Evaluation asks before decoding long completions: the static cache is
        reserved for the longest possible completion, the HF loop only grows to the ones it meets."""
        need = kv_bytes_per_token(self.model) * rows * columns
        dec = self.decoder
        held = 0 if dec is None else dec.cache_bytes(*dec.cache_shape())
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            try:
                free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):  # no such counter (macOS): all physical memory
                free = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return need <= share * (free + held)

    def _sync_weights(self) -> None:
        if self.transient:  # the weights gathered for this rollout (a one-line error outside gathered())
            self.decoder = Qwen3Decoder(self.model, merge=self.merge)
        elif self.decoder.stale():
            log.info("rollout: the model's weights or adapters changed; rebuilding the static decoder")
            rows, cols = self.decoder.cache_shape()
            self.decoder = None  # free the old buffers first
            self.decoder = Qwen3Decoder(self.model, merge=self.merge)
            if rows:
                self._reserve(rows, cols)
        else:
            self.decoder.refresh()

    def release(self) -> None:
        """Drop a transient decoder: merged weights, references to the gathered ones, KV cache, RoPE table (a
        no-op for a persistent one, which keeps its buffers for the run)."""
        if self.transient:
            self.decoder = None

    def _reserve(self, rows: int, columns: int) -> None:
        if self.decoder.reserve(rows, columns) and self.compiled is not None and self.cuda_graphs:
            # fixed addresses: CUDA graphs read them in place. Unguarded (the default of recent torch only): a
            # grown cache then re-records the graphs instead of recompiling the step
            for t in self.decoder.buffers():
                torch._dynamo.mark_static_address(t, guard=False)

    def _rows_bucket(self, live: int) -> int:
        if self.compiled is None:
            return live
        # a power of two, but not 1: a dynamic size that becomes 1 is specialised on (one more compile)
        return max(2, 1 << (live - 1).bit_length())

    def _window(self, needed: int) -> int:
        """Columns the step attends to: exact when eager; compiled, a multiple of ``window_multiple`` (few
        distinct shapes, and a bool mask whose rows stay 8-aligned, which memory-efficient attention wants)."""
        if self.compiled is None:
            return needed
        return math.ceil(needed / self.window_multiple) * self.window_multiple

    def _step(self, *args) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compiled is None:
            return decode_one(self.decoder, *args)
        tok, _, start, done, _, u, cols = args[:7]
        state = self.decoder.state()
        # rows, window and the cache's rows and columns as dynamic sizes from the first call: one compile serves
        # every bucket and every cache size (a grown cache is new tensors of new sizes, not a recompile)
        for t in (tok, start, done, u, cols, state[0]):
            if t is not None:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        for cache in state[1:]:
            torch._dynamo.maybe_mark_dynamic(cache, 0)
            torch._dynamo.maybe_mark_dynamic(cache, 2)
        try:
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            nxt, done = self.compiled(self.decoder, *args, state)
        except Exception as e:  # any compiler or generated-code failure: fall back, loudly
            log.warning("rollout: torch.compile failed (%s); decoding eagerly from now on", _describe(e))
            log.debug("rollout: the compile failure", exc_info=True)
            self.compiled = None
            self.name = self.name.replace("compiled", "static")
            raise CompileFailed from e
        return nxt.clone(), done.clone()  # CUDA-graph outputs are overwritten by the next replay

    # ---------------------------------------------------------------------------------------------------
    def _sample(self, *args) -> list[list[list[int]]]:
        """The rollouts of ``RolloutLoop.sample`` (the same tokens as the reference loop for the same seeds); a
        compile failure mid-rollout redoes it eagerly. A transient decoder is dropped on the way out, whatever
        happens."""
        try:
            try:
                return self._decode(*args)
            except CompileFailed:
                return self._decode(*args)
        finally:
            self.release()

    def generate(self, prompts: list[list[int]], **kw) -> list[list[int]]:
        """One completion per prompt (what evaluation asks ``model.generate`` for): [B] token lists, EOS kept. The
        keywords of ``RolloutLoop.sample`` but ``num_samples``; greedy unless given a ``temperature``."""
        kw = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, **kw}
        return [g[0] for g in self.sample(prompts, num_samples=1, **kw)]

    @torch.inference_mode()
    def _decode(self, prompts, G, max_new, eos_ids, pad_id, temperature, top_p, top_k, seeds):
        self._sync_weights()
        model, dec = self.model, self.decoder
        device = dec.device
        R = len(prompts) * G
        ids, attn = left_pad(prompts, pad_id)
        width = ids.shape[1]
        start = (width - attn.sum(-1)).repeat_interleave(G).to(device)  # each row's first real column
        ids, attn = ids.to(device), attn.to(device)
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        # prefill: the HF model itself, adapter on (as the reference loop), once per prompt
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        # longer than the last step's window (width + max_new - 1 columns, bucketed): a window as long as the cache
        # would be a size the compiled graph specialises on
        self._reserve(R, self._window(width + max_new - 1) + 1)
        dec.load_prefill(out.cache if "cache" in out else out.past_key_values, G, width)
        logits = out.logits[:, -1].float().repeat_interleave(G, 0)
        del out

        # every original row's uniforms [R, max_new] float64, drawn up front; step t reads column t of its live rows
        uniforms = row_uniforms(seeds, G, max_new, device) if temperature > 0 else None
        eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
        rows = None  # the original row of each batch row (None: all rows, in order)
        col = torch.tensor([width - 1], device=device)  # the column the step's input token is written at
        tokens = torch.full((R, max_new), pad_id, dtype=torch.long, device=device)
        tok = next_token(logits, None if uniforms is None else uniforms[:, 0], temperature, top_k, top_p)
        done = torch.isin(tok, eos)
        tokens[:, 0] = tok
        n, every = R, self.check_every
        for t in range(1, max_new):
            if (t - 1) % every == 0:  # the one host sync per `every` tokens
                live = (~done).nonzero().squeeze(-1)
                alive = live.numel()
                if alive == 0:
                    break
                target = self._rows_bucket(alive)
                if target < n:  # finished rows leave the batch (compiled: finished ones pad it to the bucket)
                    keep = live
                    if target > alive:
                        keep = torch.cat([live, done.nonzero().squeeze(-1)])[:target].sort().values
                    dec.keep_rows(keep, width + t - 1)
                    tok, done, start, n = tok[keep], done[keep], start[keep], target
                    rows = keep if rows is None else rows[keep]
            col += 1
            u = None
            if uniforms is not None:  # each row's own stream, wherever compaction moved it
                # contiguous either way: a column view (stride max_new) and a gathered copy (stride 1) would be
                # two graphs
                u = (uniforms[:, t] if rows is None else uniforms[rows, t]).contiguous()
            cols = dec.columns[: self._window(width + t)]
            tok, done = self._step(tok, col, start, done, eos, u, cols, temperature, top_k, top_p, pad_id)
            if rows is None:
                tokens[:, t] = tok
            else:
                tokens[rows, t] = tok
        return cut_at_eos(tokens.cpu().tolist(), G, eos_ids)
