#!/usr/bin/env python
"""BREEDS Living-17 end to end: eNTK vs linear probing on ImageNet, ID and OOD, beside the write-up's rows.

    python scripts/run_living17.py --imagenet-root /data/imagenet --weights moco_v2_800ep.pth.tar
    python scripts/run_living17.py --address auto --imagenet-root s3://bucket/imagenet --weights s3://bucket/r50.pth
    python scripts/run_living17.py --benchmark image_folder --id-train-dir A/train --id-val-dir A/val --ood-dir B
    python scripts/run_living17.py --help
"""
import sys

from entk_ray.cli import living17_main

if __name__ == "__main__":
    sys.exit(living17_main())
