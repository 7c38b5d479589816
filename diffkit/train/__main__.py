"""``python -m diffkit.train RECIPE``: train a recipe into checkpoints/RECIPE/ (see --list).

One process by default. On several: ``accelerate launch --multi_gpu --num_processes N -m
diffkit.train RECIPE`` (GPUs, or CPU processes with ``--device cpu``) or ``torchrun
--nproc_per_node N -m diffkit.train RECIPE``; see :mod:`diffkit.train.processes`.
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from diffkit import recipes
from diffkit.train import processes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffkit.train", description=__doc__)
    parser.add_argument("recipe", nargs="?", help="recipe name (see --list)")
    parser.add_argument("--list", action="store_true", help="list the recipes and exit")
    parser.add_argument("--all", action="store_true", help="train every recipe in order")
    parser.add_argument("--out", default=None, help="checkpoint root (default: checkpoints/)")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: auto)")
    parser.add_argument("--steps", type=int, default=None,
                        help="override the step count (smoke tests)")
    parser.add_argument("--measure-only", action="store_true",
                        help="re-measure an existing checkpoint's quality and update its card")
    parser.add_argument("--grad-accumulation", type=int, default=1, metavar="A",
                        help="micro-batches per process per step; the batch size stays the "
                             "recipe's (default 1)")
    parser.add_argument("--mixed-precision", choices=processes.MIXED_PRECISION, default=None,
                        help="autocast precision (a GPU feature; default: accelerate's, 'no')")
    args = parser.parse_args(argv)
    if args.list:
        for name, recipe in recipes.RECIPES.items():
            print(f"{name:24s} {recipe.description}")
        return 0
    names = list(recipes.RECIPES) if args.all else [args.recipe]
    if names == [None]:
        parser.error("give a RECIPE, --all or --list")
    try:
        options = processes.using(grad_accumulation=args.grad_accumulation,
                                  mixed_precision=args.mixed_precision)
    except ValueError as error:
        parser.error(str(error))
    with options:
        for name in names:
            card = (recipes.remeasure(name, root=args.out, device=args.device)
                    if args.measure_only else
                    recipes.run(name, root=args.out, device=args.device, steps=args.steps))
            if card is not None:            # None: not the main process of a launched run
                print(json.dumps(card, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
