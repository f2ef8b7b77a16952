"""What the two peer scripts share: the model shapes of `recover bench --shape`
(src/bench/shape.rs, BenchShape), their command-line flags, building the model, peak RSS.

Imported as `common` by the scripts next to it (Python puts a script's folder on its path).
"""

import resource
import sys

SHAPES = {
    # LlamaConfig's defaults for everything not given: untied head, eps 1e-6, theta 10000.
    "default": dict(
        hidden_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=1376,
        vocab_size=1000,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=512,
    ),
    # SmolLM2-135M's config.json.
    "smollm2": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
    ),
    # Sheared-LLaMA-1.3B's config.json.
    "sheared-1.3b": dict(
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=5504,
        vocab_size=32000,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
    ),
    # LLaMA-2-7B's.
    "llama-7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
    ),
}


def add_model_args(ap):
    """The flags both scripts take: --shape, --vocab, --threads, --bf16, --seed."""
    ap.add_argument("--shape", choices=sorted(SHAPES), default="default")
    ap.add_argument("--vocab", type=int, default=None, help="default: the shape's")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--bf16", action="store_true", help='torch.autocast("cpu", bfloat16)')
    ap.add_argument("--seed", type=int, default=0)


def add_inference_args(ap):
    """The inference scripts' extra flag: --bf16-weights."""
    ap.add_argument(
        "--bf16-weights",
        action="store_true",
        help="model.to(torch.bfloat16): bf16 weights, as from_pretrained(torch_dtype="
        "torch.bfloat16) loads them (autocast keeps f32 weights and casts them per call)",
    )


def inference_dtype(model, args):
    """The model in the dtype --bf16-weights asks for, and the label of the setting."""
    import torch

    if args.bf16_weights:
        return model.to(torch.bfloat16), "bf16-weights"
    return model, "bf16-autocast" if args.bf16 else "f32"


def build_llama(args):
    """Sets torch's threads and seed, then builds LlamaForCausalLM of the shape (random
    init, std 0.02, f32). Returns (model, config, the config's fields)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    fields = dict(SHAPES[args.shape])
    if args.vocab is not None:
        fields["vocab_size"] = args.vocab
    cfg = LlamaConfig(**fields)
    model = LlamaForCausalLM(cfg)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == cfg.tie_word_embeddings, "the head is not tied as the shape asks"
    return model, cfg, fields


def peak_rss_bytes():
    """The process's peak resident set (ru_maxrss: KiB on Linux, bytes on macOS)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024
