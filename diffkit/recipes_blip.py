"""Recipe of chapter 6 (BLIP, BLIP-2) on the captioned-shapes world.

Each recipe registers itself in ``diffkit.recipes.RECIPES`` with the ``recipe`` decorator.
"""

from __future__ import annotations
