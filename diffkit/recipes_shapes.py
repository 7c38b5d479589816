"""Recipes of chapter 6 (CLIP, BLIP) on the captioned-shapes world.

Each recipe registers itself in ``diffkit.recipes.RECIPES`` with the ``recipe`` decorator.
"""

from __future__ import annotations
