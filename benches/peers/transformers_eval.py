#!/usr/bin/env python3
"""transformers peer of `recover bench eval`: multiple-choice scoring, the straightforward way.

The same shape as `recover bench eval`: LlamaForCausalLM of the `--shape` (`default`:
hidden 512, 6 layers, 8 heads, MLP 1376, vocab 1000, untied head; `smollm2`: SmolLM2-135M's
hidden 576, 30 layers, 9 heads, 3 kv heads, MLP 1536, vocab 49152, tied head; random init,
f32), 64 questions of a 96-token random prompt with 4
options of 4 random tokens, 8 questions per batch. Each batch is one forward pass over its
8 x 4 (prompt + option) sequences; an option's score is the sum of its tokens'
log-probabilities. One untimed pass, then timed passes; the median gives questions/s.

    python transformers_eval.py [--shape default|smollm2] [--runs 5] [--questions 64]
                                [--vocab N] [--threads 2] [--bf16 | --bf16-weights]
"""

import argparse
import json
import platform
import statistics
import time

from common import add_inference_args, add_model_args, build_llama, inference_dtype, peak_rss_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--questions", type=int, default=64)
    add_model_args(ap)
    add_inference_args(ap)
    args = ap.parse_args()

    import torch
    import transformers

    prompt_len, options, option_len, batch = 96, 4, 4, 8
    model, cfg, shape = build_llama(args)
    model, dtype = inference_dtype(model, args)
    model.eval()
    vocab = cfg.vocab_size
    base_params = sum(p.numel() for p in model.parameters())  # a tied head counted once
    prompts = torch.randint(0, vocab, (args.questions, 1, prompt_len))
    opts = torch.randint(0, vocab, (args.questions, options, option_len))
    # (questions, options, prompt_len + option_len)
    seqs = torch.cat([prompts.expand(-1, options, -1), opts], dim=2)

    def one_pass():
        total = 0.0
        with torch.inference_mode(), torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=args.bf16
        ):
            for q in range(0, args.questions, batch):
                ids = seqs[q : q + batch].reshape(-1, prompt_len + option_len)
                logits = model(input_ids=ids).logits.float()
                # Positions prompt_len-1 .. end-1 predict the option's tokens.
                lp = torch.log_softmax(logits[:, prompt_len - 1 : -1], dim=-1)
                tgt = ids[:, prompt_len:].unsqueeze(-1)
                total += lp.gather(-1, tgt).sum().item()
        return total

    one_pass()
    run_s = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        score_sum = one_pass()
        run_s.append(time.perf_counter() - t0)
    med = statistics.median(run_s)
    peak = peak_rss_bytes()
    print(
        json.dumps(
            {
                "peer": "transformers",
                "dtype": dtype,
                "threads": torch.get_num_threads(),
                "shape": args.shape,
                "config": shape,
                "vocab": vocab,
                "base_params": base_params,
                "questions": args.questions,
                "run_s": run_s,
                "median_run_s": med,
                "questions_per_s": args.questions / med,
                "tokens_per_run": int(seqs.numel()),
                "score_sum": score_sum,
                "peak_rss_bytes": peak,
                "versions": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
