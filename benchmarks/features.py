"""Per-example gradient feature throughput against its cost floor.

EfficientNet-Lite0 (bundled weights) at 32 px, batch 32, p = 500,000. The floor is one batched
forward + backward of the same model and batch (what a training step costs); a per-example
feature method cannot be cheaper than that. Prints the median examples/s of

  * floor      one batched forward+backward (parameter .grad of the summed output)
  * hooks      HookFeatureComputer (default)
  * func       FuncFeatureComputer (torch.func vmap(grad), chunked)
  * loop       a naive per-example autograd loop, gathering S

then ``ratio: <hooks / floor>`` as the last line (target ≥ 0.5).

    python benchmarks/features.py [--repeats 5] [--image-size 32] [--batch 32] [--p 500000]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from entk_ray.config import ModelConfig
from entk_ray.features import make_feature_computer, select_parameters
from entk_ray.models import build_model


def throughput(fn, batch: int, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rates.append(batch / (time.perf_counter() - start))
    return statistics.median(rates), rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--p", type=int, default=500_000)
    parser.add_argument("--skip-loop", action="store_true", help="skip the slow naive loop")
    args = parser.parse_args()

    model = build_model(ModelConfig(name="efficientnet_lite0"))
    subset = select_parameters(model, args.p, seed=0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    params = [prm for name, prm in model.named_parameters() if name in subset.names]
    local = subset.per_parameter()
    named = [(n, prm) for n, prm in model.named_parameters() if n in local]

    def floor():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    def loop():
        rows = []
        for i in range(x.shape[0]):
            grads = torch.autograd.grad(model(x[i:i + 1]).sum(), [prm for _, prm in named])
            rows.append(torch.cat([g.reshape(-1)[local[n]] for (n, _), g in zip(named, grads)]))
        return torch.stack(rows)

    hooks = make_feature_computer(model, subset, "hooks")
    func = make_feature_computer(model, subset, "func", chunk_size=8)
    results = {"floor": throughput(floor, args.batch, args.repeats),
               "hooks": throughput(lambda: hooks(x), args.batch, args.repeats),
               "func": throughput(lambda: func(x), args.batch, args.repeats)}
    if not args.skip_loop:
        results["loop"] = throughput(loop, args.batch, max(1, args.repeats // 2))
    torch.testing.assert_close(hooks(x), func(x), rtol=1e-4, atol=1e-6)
    del params

    print(f"EfficientNet-Lite0, {args.image_size} px, batch {args.batch}, p={subset.p:,} of {subset.total:,}, "
          f"threads={torch.get_num_threads()}")
    for name, (median, rates) in results.items():
        print(f"{name:>6}: median {median:8.1f} examples/s  {[round(r, 1) for r in rates]}")
    print(f"func / floor: {results['func'][0] / results['floor'][0]:.3f}")
    if "loop" in results:
        print(f"hooks / naive per-example loop: {results['hooks'][0] / results['loop'][0]:.2f}")
    print(f"ratio: {results['hooks'][0] / results['floor'][0]:.3f}")


if __name__ == "__main__":
    main()
