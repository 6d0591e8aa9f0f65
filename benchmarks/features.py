"""Per-example gradient feature throughput against its cost floor, on one device.

The floor is one batched forward + backward of the same model and batch (a training step's cost,
parameter gradients summed over the batch); a per-example feature method is compared with it.
Rows, all on the same device and batch, repeats interleaved (floor, bound, sampled, hooks, ...,
then again) so that drifting machine load hits every row alike:

  * floor          batched forward + backward to the parameters (.grad of Σ_b f)
  * bound          forward + backward to the activations only (no parameter gradient): what any
                   method that skips full weight gradients pays before its sampled products
  * sampled        SampledFeatureComputer (the default): only S's coordinates
  * sampled-alloc  the same, allocating a new Φ every call (the other rows write Φ into one
                   reused (B, p) buffer, as compute_features writes into the dataset's Φ)
  * hooks          HookFeatureComputer: every hooked layer's full per-example gradient, then S
  * func           FuncFeatureComputer: torch.func vmap(grad), chunked
  * loop           a per-example autograd loop (slow; only if asked)

Each row prints median examples/s, the spread (min–max over repeats) and the ratio of medians to
the floor; then each computer's peak memory (CUDA: max_memory_allocated above the baseline;
CPU: growth of the peak resident set during one call, Linux /proc, after malloc_trim), and the
pipeline throughput: ``compute_features`` over a dataset of in-memory images, Φ on the host.
The last line is ``ratio: <sampled / floor>``.

    python benchmarks/features.py                       # Lite0 (bundled weights), 32 px, batch 32, CPU
    python benchmarks/features.py --model resnet50      # random weights, 224 px, batch 128, CUDA if present
    python benchmarks/features.py --model resnet18 --image-size 64 --batch 16 --device cpu
    python benchmarks/features.py --threads 1 --clock process   # steadier on a loaded CPU
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from entk_ray.config import ModelConfig
from entk_ray.data.base import TensorLabeledDataset
from entk_ray.features import compute_features, make_feature_computer, peak_memory_bytes, select_parameters
from entk_ray.models import ScalarHeadModel, build_model, create_resnet_backbone

DEFAULTS = {"efficientnet_lite0": (32, 32), "resnet18": (224, 128), "resnet50": (224, 128)}  # image size, batch


def build(name: str) -> ScalarHeadModel:
    if name == "efficientnet_lite0":
        return build_model(ModelConfig(name=name))  # bundled weights, no download
    dims = {"resnet18": 512, "resnet50": 2048}
    return ScalarHeadModel(create_resnet_backbone(name), dims[name])  # random weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0", choices=list(DEFAULTS))
    parser.add_argument("--image-size", type=int, default=None, help="default: 32 for Lite0, 224 for ResNets")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 for Lite0, 128 for ResNets")
    parser.add_argument("--p", type=int, default=500_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    parser.add_argument("--computers", default="sampled,sampled-alloc,hooks,func",
                        help="comma list of sampled, sampled-alloc, hooks, func, loop")
    parser.add_argument("--tf32", action="store_true", help="TF32 for the computers' CUDA matmuls/convs")
    parser.add_argument("--pipeline-batches", type=int, default=4, help="dataset size for compute_features, in batches")
    parser.add_argument("--storage-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--clock", default="wall", choices=["wall", "process"],
                        help="process: this process's CPU time (steadier under load; CPU with 1 thread only)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "process" and torch.get_num_threads() != 1:
        parser.error("--clock process needs --threads 1 (CPU time of several threads is not elapsed time)")

    size, batch = DEFAULTS[args.model]
    size = args.image_size or size
    batch = args.batch or batch
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    clock = time.process_time if args.clock == "process" else time.perf_counter
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    model = build(args.model).to(device).eval()
    subset = select_parameters(model, args.p, seed=0)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    params = [prm for prm in model.parameters() if prm.requires_grad]
    names = [c for c in args.computers.split(",") if c]
    unknown = set(names) - {"sampled", "sampled-alloc", "hooks", "func", "loop"}
    if unknown:
        parser.error(f"unknown computers: {sorted(unknown)}")

    computers = {"sampled": make_feature_computer(model, subset, "sampled", tf32=args.tf32)}
    if "hooks" in names:
        computers["hooks"] = make_feature_computer(model, subset, "hooks", tf32=args.tf32)
    if "func" in names:
        computers["func"] = make_feature_computer(model, subset, "func", chunk_size=8, tf32=args.tf32)
    phi = torch.empty(batch, subset.p, device=device)  # reused output buffer
    local = subset.per_parameter()
    named = [(n, prm) for n, prm in model.named_parameters() if n in local]

    def floor():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    def bound():  # forward + backward to the activations only (input made a leaf, parameters frozen)
        for prm in params:
            prm.requires_grad_(False)
        try:
            leaf = x.detach().requires_grad_(True)
            torch.autograd.grad(model(leaf).sum(), leaf)
        finally:
            for prm in params:
                prm.requires_grad_(True)

    def loop():
        for i in range(batch):
            grads = torch.autograd.grad(model(x[i:i + 1]).sum(), [prm for _, prm in named])
            phi[i] = torch.cat([g.reshape(-1)[local[n].to(device)] for (n, _), g in zip(named, grads)])

    rows = {"floor": floor, "bound": bound, "sampled": lambda: computers["sampled"](x, out=phi)}
    if "sampled-alloc" in names:
        rows["sampled-alloc"] = lambda: computers["sampled"](x)
    for name in ("hooks", "func"):
        if name in computers:
            rows[name] = (lambda c: lambda: c(x, out=phi))(computers[name])
    if "loop" in names:
        rows["loop"] = loop

    for fn in rows.values():  # warm-up (allocator, kernels, workspaces)
        fn()
    sync()
    rates: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, fn in rows.items():
            sync()
            start = clock()
            fn()
            sync()
            rates[name].append(batch / (clock() - start))
    median = {name: statistics.median(r) for name, r in rates.items()}

    memory = {}
    for name in ("floor", "bound", *[n for n in rows if n not in ("floor", "bound")]):
        memory[name] = peak_memory_bytes(rows[name], device)

    reference = computers["hooks"](x) if "hooks" in computers else None
    if reference is not None:  # the two computers agree on the benchmark batch
        torch.testing.assert_close(computers["sampled"](x), reference, rtol=1e-4, atol=1e-6)

    # Pipeline: a dataset of in-memory images through compute_features (Φ on the host).
    n_images = batch * args.pipeline_batches
    images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(1))
    dataset = TensorLabeledDataset(images, np.zeros(n_images, dtype=np.int64))
    pipeline_rates = []
    for _ in range(3):
        stats: dict = {}
        sync()
        start = clock()
        compute_features(computers["sampled"], dataset, batch_size=batch, storage_dtype=args.storage_dtype,
                         stats=stats)
        pipeline_rates.append(n_images / (clock() - start))

    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"
    print(f"{args.model}, {size} px, batch {batch}, p={subset.p:,} of {subset.total:,}, {where}, "
          f"{args.clock} clock, {args.repeats} interleaved repeats, tf32={args.tf32}")
    floor_rate = median["floor"]
    for name, r in rates.items():
        mem = memory.get(name)
        mem_text = "n/a" if mem is None else f"{mem / 2**20:8.1f} MiB"
        print(f"{name:>14}: {median[name]:9.1f} ex/s  spread {min(r):8.1f}–{max(r):8.1f}  "
              f"/ floor {median[name] / floor_rate:6.3f}  peak memory {mem_text}")
    pipe = statistics.median(pipeline_rates)
    print(f"{'pipeline':>14}: {pipe:9.1f} ex/s  spread {min(pipeline_rates):8.1f}–{max(pipeline_rates):8.1f}  "
          f"/ floor {pipe / floor_rate:6.3f}  (compute_features, {n_images} images, Φ on host in "
          f"{args.storage_dtype}, sampled computer; its own rate: {median['sampled']:.1f} ex/s)")
    if "storage_kernel_rel_error" in stats and args.storage_dtype != "float32":
        print(f"{'':>14}  K error of {args.storage_dtype} Φ on the first batch: {stats['storage_kernel_rel_error']:.2e}")
    print(f"ratio: {median['sampled'] / floor_rate:.3f}")


if __name__ == "__main__":
    main()
