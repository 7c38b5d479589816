"""Recipes: ``python -m diffkit.train NAME`` trains a checkpoint and writes its card.

:mod:`diffkit.recipes.registry` holds the registry and the runner and imports no recipe; each
chapter group registers its recipes from its own module, all imported here:
``ddpm`` (chapter 1), ``schedules`` (2), ``clip`` and ``blip`` (6), ``guidance`` (7),
``latent`` (8), ``sd`` (9), ``control`` (13), ``lora`` (11), ``personalize`` (12).
Recipes only train; what they measure is computed by :mod:`diffkit.eval`.
"""

# isort: off
# imported in training order: `--all` trains the digits judge before the models it measures
from diffkit.recipes import ddpm, schedules, clip, blip, guidance, latent, sd, control, lora, personalize  # noqa: F401,E501  (they register)
# isort: on
from diffkit.recipes.ddpm import DIGITS_UNET, ddpm_loss  # noqa: F401
from diffkit.recipes.registry import RECIPES, SEED, TIME_BAR_SECONDS, Recipe, recipe, remeasure, run  # noqa: F401
