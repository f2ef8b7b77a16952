#!/usr/bin/env python3
"""PyTorch peer of `recover bench products` for the f32 kernel: `torch.matmul` in f32 on
the products of a training step at 1,024 rows (MKL on an Intel CPU, oneDNN/OpenBLAS
elsewhere), fastest of 10 calls after 3 untimed ones, in GFLOP/s. Compare its rows with the
"f32 gemm" column of `recover bench products --shape default` (and `--shape smollm2`): it
says how much a different f32 library could win per product.

    python torch_matmul.py [--threads 2] [--rows 1024]
"""

import argparse
import time

import torch

# (name, n, k) of `x Wᵀ` for W (n × k); `dy W` is the same product with n and k swapped.
PRODUCTS = [
    ("default q/k/v/o", 512, 512),
    ("default gate/up", 1376, 512),
    ("default down", 512, 1376),
    ("smollm2 q/o", 576, 576),
    ("smollm2 gate/up", 1536, 576),
    ("smollm2 down", 576, 1536),
]


def gflops(m: int, n: int, k: int, transposed: bool) -> float:
    x = torch.randn(m, k)
    w = torch.randn(n, k) if transposed else torch.randn(k, n)
    f = (lambda: x @ w.t()) if transposed else (lambda: x @ w)
    for _ in range(3):
        f()
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return 2 * m * n * k / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rows} rows, f32")
    print("| product | x Wᵀ (GFLOP/s) | dy W (GFLOP/s) |")
    print("|---|---:|---:|")
    for name, n, k in PRODUCTS:
        forward = gflops(args.rows, n, k, transposed=True)
        backward = gflops(args.rows, k, n, transposed=False)
        print(f"| {name} ({n} × {k}) | {forward:.0f} | {backward:.0f} |")


if __name__ == "__main__":
    main()
