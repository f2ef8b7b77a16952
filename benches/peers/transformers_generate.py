#!/usr/bin/env python3
"""transformers peer of `recover bench generate`: greedy decoding with `model.generate`.

The same workload as `recover bench generate`: LlamaForCausalLM of the `--shape` (random
init, f32), 16 prompts of 64 random tokens, 8 per batch, 32 new tokens each, greedy
(`do_sample=False, num_beams=1`), KV cache on (transformers' default), every row decoding
all 32 tokens (`min_new_tokens=max_new_tokens`, as rora's benchmark uses no stop token).
The prompts are full length (no padding), as in rora's benchmark. One untimed pass, then
timed passes; new tokens/s = 16 x 32 / median pass (prefill included on both sides).

    python transformers_generate.py [--shape default|smollm2] [--runs 3] [--prompts 16]
                                    [--new-tokens 32] [--vocab N] [--threads 2] [--bf16 | --bf16-weights]
"""

import argparse
import json
import platform
import statistics
import time

from common import add_inference_args, add_model_args, build_llama, inference_dtype, peak_rss_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    add_model_args(ap)
    add_inference_args(ap)
    args = ap.parse_args()

    import torch
    import transformers

    prompt_len, batch = 64, 8
    model, cfg, shape = build_llama(args)
    model, dtype = inference_dtype(model, args)
    model.eval()
    vocab = cfg.vocab_size
    base_params = sum(p.numel() for p in model.parameters())
    prompts = torch.randint(0, vocab, (args.prompts, prompt_len))

    def one_pass():
        total = 0
        with torch.inference_mode(), torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=args.bf16
        ):
            for q in range(0, args.prompts, batch):
                ids = prompts[q : q + batch]
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=0,
                )
                new = out[:, prompt_len:]
                assert new.shape[1] == args.new_tokens, new.shape
                total += int(new.sum())
        return total

    one_pass()
    run_s = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        token_sum = one_pass()
        run_s.append(time.perf_counter() - t0)
    med = statistics.median(run_s)
    print(
        json.dumps(
            {
                "peer": "transformers-generate",
                "dtype": dtype,
                "threads": torch.get_num_threads(),
                "shape": args.shape,
                "config": shape,
                "vocab": vocab,
                "base_params": base_params,
                "prompts": args.prompts,
                "new_tokens": args.new_tokens,
                "run_s": run_s,
                "median_run_s": med,
                "new_tokens_per_s": args.prompts * args.new_tokens / med,
                "token_sum": token_sum,
                "peak_rss_bytes": peak_rss_bytes(),
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
