"""Print the planner's tables for docs/scaling.md, or rewrite the doc's marked regions with them.

    python scripts/plan_tables.py                           # the tables (= python -m entk_ray.plan --markdown)
    python scripts/plan_tables.py --write docs/scaling.md   # regenerate the doc's tables and its H100 plan
    python scripts/plan_tables.py --check docs/scaling.md   # exit 1 when the doc is out of date
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from entk_ray.plan import markdown_tables, update_doc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="DOC", help="rewrite the doc's <!-- plan-…: begin/end --> regions")
    group.add_argument("--check", metavar="DOC", help="exit 1 if the doc's regions are not the current output")
    args = parser.parse_args()
    if args.write or args.check:
        path = Path(args.write or args.check)
        text = path.read_text()
        updated = update_doc(text)
        if args.check:
            if updated != text:
                print(f"{path} is out of date: run python scripts/plan_tables.py --write {path}", file=sys.stderr)
                return 1
            return 0
        path.write_text(updated)
        print(f"updated {path}")
        return 0
    print(markdown_tables())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
