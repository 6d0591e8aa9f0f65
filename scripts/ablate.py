#!/usr/bin/env python
"""Feature maps × p × seeds on one benchmark, sharing feature passes (entk_ray.ablation).

    python scripts/ablate.py --grid grids/digits.yaml              # local Ray, results/ablation/digits
    python scripts/ablate.py --grid grids/digits.yaml --no-ray --maps uniform --seeds 0
"""
import sys

from entk_ray.ablation import main

if __name__ == "__main__":
    sys.exit(main())
