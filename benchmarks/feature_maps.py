"""What a feature map costs per example against the default uniform subset, on one device.

Rows (same model, batch and device; repeats interleaved so drifting load hits every row alike):
each ``--maps`` entry at its p (``map@p``), process CPU time (``--clock process``, steadier on a
loaded machine) or wall time. Prints median seconds per example and the ratio to the first row;
the last line is ``ratio: <last row / first row>``.

    python benchmarks/feature_maps.py                                    # uniform@500000 vs jl@1000, Lite0, 32 px
    python benchmarks/feature_maps.py --maps uniform@500000,stratified@500000,jl@1000,jl@5000
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from entk_ray.config import ModelConfig
from entk_ray.feature_maps import build_feature_map
from entk_ray.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", default="uniform@500000,jl@1000")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("process", "wall"), default="process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    model = build_model(ModelConfig(name=args.model)).eval()
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    rows = []
    for item in args.maps.split(","):
        spec, _, p = item.partition("@")
        fmap = build_feature_map(model, spec, int(p), 0)
        computer = fmap.computer(model)
        computer(x[:2])  # warm-up (buffers, plans)
        rows.append((item, fmap, computer, []))
    for _ in range(args.repeats):
        for _, _, computer, times in rows:
            start = clock()
            computer(x)
            times.append((clock() - start) / args.batch)
    base = statistics.median(rows[0][3])
    print(f"{args.model}, {args.image_size} px, batch {args.batch}, {args.threads} thread(s), {args.clock} time, "
          f"median of {args.repeats}")
    print("| map@p | s / example | min–max | / first |")
    print("|---|---|---|---|")
    for item, _, _, times in rows:
        med = statistics.median(times)
        print(f"| {item} | {med:.4f} | {min(times):.4f}–{max(times):.4f} | {med / base:.2f} |")
    print(f"ratio: {statistics.median(rows[-1][3]) / base:.3f}")


if __name__ == "__main__":
    main()
