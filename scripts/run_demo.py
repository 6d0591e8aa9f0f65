#!/usr/bin/env python
"""Quick-start: eNTK vs linear probing on the digits shift (MNIST-5k → UCI optdigits), offline on a CPU.

    python scripts/run_demo.py                 # embedded defaults, results in results/demo/
    python scripts/run_demo.py --out /tmp/demo --p 200000 --n-train 2000
    python scripts/run_demo.py --help
"""
import sys

from entk_ray.cli import demo_main

if __name__ == "__main__":
    sys.exit(demo_main())
