"""Agreement of the feature computers on a GPU (the CPU suite checks the same on the CPU).

For random-weight ResNet-18 and ResNet-50 (and the bundled Lite0), a batch of images and a few
thousand sampled coordinates, Φ from the default ``sampled`` computer (its Triton conv kernel on
CUDA, and its torch path), ``hooks`` and ``func`` are compared with each other; prints the
relative error ‖Φ_a − Φ_ref‖_F / ‖Φ_ref‖_F of each against ``func`` (torch.func vmap(grad)) and
exits 1 if any exceeds 1e-5 (float32 computation, TF32 off).

    python scripts/gpu_features_check.py               # CUDA if present, else CPU (torch path only)
    python scripts/gpu_features_check.py --p 500 --batch 4 --image-size 32
"""
from __future__ import annotations

import argparse
import sys

import torch

from entk_ray.features import (FuncFeatureComputer, HookFeatureComputer, SampledFeatureComputer,
                               select_parameters)
from entk_ray.models import ScalarHeadModel, create_lite0_backbone, create_resnet_backbone

TOLERANCE = 1e-5


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--p", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_features_check: {name}, torch {torch.__version__}, p={args.p}, batch={args.batch}, "
          f"{args.image_size} px, tolerance {TOLERANCE:g}")
    builders = {"resnet18": lambda: create_resnet_backbone("resnet18"),
                "resnet50": lambda: create_resnet_backbone("resnet50"),
                "efficientnet_lite0": create_lite0_backbone}
    worst = 0.0
    for model_name, build in builders.items():
        torch.manual_seed(0)
        model = ScalarHeadModel(build(), head_seed=0).to(device)
        subset = select_parameters(model, args.p, seed=0)
        x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
        x = x.to(device)
        reference = FuncFeatureComputer(model, subset, chunk_size=2)(x)
        backends = ["torch"] + (["triton"] if device.type == "cuda" else [])
        rows = {f"sampled[{b}]": SampledFeatureComputer(model, subset, conv_backend=b)(x) for b in backends}
        rows["hooks"] = HookFeatureComputer(model, subset)(x)
        for label, phi in rows.items():
            err = relative_error(phi, reference)
            worst = max(worst, err)
            print(f"  {model_name:<20} {label:<16} rel. error vs func {err:.2e}  {'ok' if err <= TOLERANCE else 'FAIL'}")
    print(f"worst: {worst:.2e}")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
