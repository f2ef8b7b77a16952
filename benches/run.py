#!/usr/bin/env python3
"""Regenerates the README's Performance table: rora's benchmarks and their Python peers,
alternating, several rounds in one sitting, medians and ratios.

Each round runs every cell once, rora and its peer back to back (in alternating order
from round to round), so that a slow patch of a shared machine hits both sides alike.
Every run is one JSON line in OUT/results.jsonl (resumable: cells already measured
`--rounds` times are skipped); OUT/table.md is the summary: per cell the median over
rounds of each side's tokens/s (or new tokens/s), their ratio, and peak RSS.

    python benches/run.py --out runs/bench [--rounds 5] [--cells default-train,...]
        [--rora target/release/recover] [--python python3] [--threads 2]

Cells (name: what):
  {train-SHAPE-dDROPOUT-rRANK}: `recover bench train` vs peers/peft_train.py, f32
  {train-SHAPE-dDROPOUT-rRANK-bf16}: the same with `--matmul-precision bf16` against
      PyTorch's bf16 autocast (`--bf16`)
  {generate-SHAPE}: `recover bench generate` vs peers/transformers_generate.py, f32
  {generate-SHAPE-bf16}: the same with `--matmul-precision bf16` against transformers
      with bf16 weights (`--bf16-weights`, as from_pretrained(torch_dtype=bfloat16)
      loads them: the faster of PyTorch's two bf16 settings for decoding here)
The default cells include the bf16 ones only on CPUs with a bf16 kernel for rora (AMX or
AVX512-BF16, read from /proc/cpuinfo); elsewhere rora's bf16 would be its f32.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

DEFAULT_CELLS = [
    "train-default-d0-r8",
    "train-default-d0.05-r8",
    "train-default-d0-r128",
    "train-default-d0.05-r128",
    "train-smollm2-d0-r8",
    "train-smollm2-d0.05-r8",
    "train-smollm2-d0-r128",
    "train-smollm2-d0.05-r128",
    "generate-default",
    "generate-smollm2",
]
BF16_CELLS = [
    "train-default-d0-r8-bf16",
    "train-default-d0.05-r8-bf16",
    "train-default-d0-r128-bf16",
    "train-default-d0.05-r128-bf16",
    "train-smollm2-d0-r8-bf16",
    "train-smollm2-d0.05-r8-bf16",
    "train-smollm2-d0-r128-bf16",
    "train-smollm2-d0.05-r128-bf16",
    "generate-default-bf16",
    "generate-smollm2-bf16",
]


def cpu_has_bf16_kernel():
    """Whether rora's bf16 products run here: AMX or AVX512-BF16 in /proc/cpuinfo."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return {"amx_bf16", "amx_tile"} <= flags or "avx512_bf16" in flags


def commands(cell, args):
    """(rora argv, peer argv, the JSON key of the throughput) for a cell."""
    kind, shape, *rest = cell.split("-")
    if kind == "train":
        dropout, rank = rest[0][1:], rest[1][1:]
        if rest[2:] not in ([], ["bf16"]):
            sys.exit(f"unknown cell {cell!r}: a train cell ends in -rRANK or -rRANK-bf16")
        bf16 = rest[2:] == ["bf16"]
        steps = ["--steps", "5", "--warmup", "1"] if shape == "default" else ["--steps", "3", "--warmup", "1"]
        rora = [args.rora, "bench", "train", "--shape", shape, "--dropout", dropout,
                "--rank", rank, "--json", *steps]
        peer = [args.python, str(HERE / "peers/peft_train.py"), "--shape", shape,
                "--dropout", dropout, "--rank", rank, "--threads", str(args.threads), *steps]
        if bf16:
            rora += ["--matmul-precision", "bf16"]
            peer += ["--bf16"]
        return rora, peer, "tokens_per_s"
    if kind == "generate":
        if rest not in ([], ["bf16"]):
            sys.exit(f"unknown cell {cell!r}: a generate cell is generate-SHAPE or generate-SHAPE-bf16")
        rora = [args.rora, "bench", "generate", "--shape", shape, "--json"]
        peer = [args.python, str(HERE / "peers/transformers_generate.py"), "--shape", shape,
                "--threads", str(args.threads)]
        if rest == ["bf16"]:
            rora += ["--matmul-precision", "bf16"]
            peer += ["--bf16-weights"]
        return rora, peer, "new_tokens_per_s"
    sys.exit(f"unknown cell {cell!r}; cells look like {DEFAULT_CELLS[0]} or generate-smollm2")


def run_json(argv, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=HERE / "peers")
    if out.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def label(cell):
    """`train-smollm2-d0.05-r128-bf16` → `train, smollm2, dropout 0.05, r128, bf16`."""
    parts = cell.split("-")
    precision = "bf16" if parts[-1] == "bf16" else "f32"
    if parts[0] == "train":
        return f"train, {parts[1]}, dropout {parts[2][1:]}, {parts[3]}, {precision}"
    return f"generate, {parts[1]}, {precision}"


def summarize(rows, cells):
    """The README's table: each side's median, the median of the per-round ratios (each
    from runs minutes apart) with the lowest and highest round, the peak RSS (highest
    round) and its ratio."""
    lines = [
        "| cell | rora | peer | rora / peer | range | peak RSS rora / peer (MiB) | rounds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        r = [x for x in rows if x["cell"] == cell]
        if not r:
            continue
        rora = statistics.median(x["rora"] for x in r)
        peer = statistics.median(x["peer"] for x in r)
        ratios = [x["rora"] / x["peer"] for x in r]
        mem = lambda k: max(x[k] or 0 for x in r) / 2**20
        num = lambda v: f"{v:,.0f}" if v >= 1000 else f"{v:,.1f}"
        rss = f"{mem('rora_rss'):,.0f} / {mem('peer_rss'):,.0f}"
        if mem("peer_rss"):
            rss += f" ({mem('rora_rss') / mem('peer_rss'):.2f})"
        lines.append(
            f"| {label(cell)} | {num(rora)} | {num(peer)} | **{statistics.median(ratios):.2f}×** "
            f"| {min(ratios):.2f}–{max(ratios):.2f} | {rss} | {len(r)} |"
        )
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    default_cells = DEFAULT_CELLS + (BF16_CELLS if cpu_has_bf16_kernel() else [])
    ap.add_argument("--cells", default=",".join(default_cells))
    ap.add_argument("--rora", default=str(HERE.parent / "target/release/recover"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.rora = str(Path(args.rora).resolve())
    cells = args.cells.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = [json.loads(l) for l in results.read_text().splitlines()] if results.exists() else []
    for rnd in range(args.rounds):
        for cell in cells:
            if sum(1 for x in rows if x["cell"] == cell) > rnd:
                continue
            rora_argv, peer_argv, key = commands(cell, args)
            order = [("rora", rora_argv), ("peer", peer_argv)]
            if rnd % 2:
                order.reverse()
            got = {}
            for side, argv in order:
                got[side] = run_json(argv, args.threads)
            row = {
                "cell": cell,
                "round": rnd,
                "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "rora": got["rora"][key],
                "peer": got["peer"][key],
                "rora_rss": got["rora"].get("peak_rss_bytes"),
                "peer_rss": got["peer"].get("peak_rss_bytes"),
            }
            rows.append(row)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"round {rnd + 1} {cell}: rora {row['rora']:.1f} peer {row['peer']:.1f}",
                  flush=True)
    table = summarize(rows, cells)
    (args.out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
