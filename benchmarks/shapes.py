"""Model shapes the benchmarks share (Qwen3Config keyword arguments; random weights are enough for timing)."""

# Qwen3-1.7B: hidden 2048, 28 layers, 16 query / 8 KV heads of 128, V=151936, tied LM head.
QWEN3_1P7B = dict(
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
)
