"""``python -m diffkit.train RECIPE``: train a recipe into checkpoints/RECIPE/ (see --list)."""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from diffkit import recipes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffkit.train", description=__doc__)
    parser.add_argument("recipe", nargs="?", help="recipe name (see --list)")
    parser.add_argument("--list", action="store_true", help="list the recipes and exit")
    parser.add_argument("--all", action="store_true", help="train every recipe in order")
    parser.add_argument("--out", default=None, help="checkpoint root (default: checkpoints/)")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: auto)")
    parser.add_argument("--steps", type=int, default=None, help="override the step count (smoke tests)")
    parser.add_argument("--measure-only", action="store_true",
                        help="re-measure an existing checkpoint's quality and update its card")
    args = parser.parse_args(argv)
    if args.list:
        for name, recipe in recipes.RECIPES.items():
            print(f"{name:24s} {recipe.description}")
        return 0
    names = list(recipes.RECIPES) if args.all else [args.recipe]
    if names == [None]:
        parser.error("give a RECIPE, --all or --list")
    for name in names:
        card = (recipes.remeasure(name, root=args.out, device=args.device) if args.measure_only
                else recipes.run(name, root=args.out, device=args.device, steps=args.steps))
        print(json.dumps(card, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
