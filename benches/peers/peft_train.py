#!/usr/bin/env python3
"""PyTorch + transformers + PEFT peer of `recover bench train`.

The same step on the same shape: LlamaForCausalLM of the `--shape` (`default`: hidden 512,
6 layers, 8 heads, 8 kv heads, MLP 1376, vocab 1000 or 32000, untied head; `smollm2`:
SmolLM2-135M's hidden 576, 30 layers, 9 heads, 3 kv heads, MLP 1536, vocab 49152, tied
head), random init, PEFT LoRA r=--rank (8) alpha=2r dropout --dropout (default 0) on all 7 projections, AdamW lr 1e-4
on the adapters, batch 8 x 128 random token ids, loss on the shifted targets, gradient
clipping at 1.0 (as rora's finetune and HF's Trainer do). Warm-up steps, then timed steps;
the median step gives tokens/s.

Prints one JSON object with the keys of `recover bench train --json` that make sense here
(tokens_per_s, median_step_s, step_s, peak_rss_bytes, base_params, matmul_params,
trainable_params, ...).

    python peft_train.py [--shape default|smollm2|sheared-1.3b|llama-7b] [--steps 10]
                         [--warmup 2] [--vocab N] [--dropout 0.05] [--rank 8]
                         [--batch 8] [--seq-len 128]
                         [--threads 2] [--bf16]
"""

import argparse
import json
import platform
import statistics
import time

from common import add_model_args, build_llama, peak_rss_bytes


def rss_bytes(key):
    """A kB line of /proc/self/status in bytes (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def param_counts(model, cfg):
    """(base, matmul) as rora counts them: every parameter once (a tied head is the
    embedding), and the 7 projections of every layer plus the vocab x hidden output head."""
    base = sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates
    proj = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1].endswith("_proj")
    )
    return base, proj + cfg.vocab_size * cfg.hidden_size


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--dropout", type=float, default=0.0, help="lora_dropout (default 0, PEFT's default)"
    )
    ap.add_argument("--rank", type=int, default=8, help="LoRA r (alpha = 2 r)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    add_model_args(ap)
    args = ap.parse_args()

    import torch
    import transformers
    import peft
    from peft import LoraConfig, get_peft_model

    batch, seq = args.batch, args.seq_len
    model, cfg, shape = build_llama(args)
    vocab = cfg.vocab_size
    base_params, matmul_params = param_counts(model, cfg)
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=args.dropout,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones_like(ids)
    rss_after_setup = rss_bytes("VmRSS")

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            # labels=ids: transformers shifts them inside (position t predicts t+1).
            out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    step_s, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = step()
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            step_s.append(dt)
            losses.append(loss)

    med = statistics.median(step_s)
    trainable = sum(p.numel() for p in params)
    peak = peak_rss_bytes()
    print(
        json.dumps(
            {
                "peer": "pytorch+peft",
                "dtype": "bf16-autocast" if args.bf16 else "f32",
                "threads": torch.get_num_threads(),
                "shape": args.shape,
                "config": shape,
                "vocab": vocab,
                "batch": batch,
                "rank": args.rank,
                "dropout": args.dropout,
                "seq_len": seq,
                "base_params": base_params,
                "matmul_params": matmul_params,
                "trainable_params": trainable,
                "tokens_per_step": batch * seq,
                "step_s": step_s,
                "median_step_s": med,
                "tokens_per_s": batch * seq / med,
                "first_loss": losses[0],
                "last_loss": losses[-1],
                "rss_after_setup_bytes": rss_after_setup,
                "peak_rss_bytes": peak,
                "versions": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "peft": peft.__version__,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
