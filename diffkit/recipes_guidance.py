"""Recipes of chapter 7 (guidance): a noise-conditional digits classifier and a class-conditional digits DDPM.

Each recipe registers itself in ``diffkit.recipes.RECIPES`` with the ``recipe`` decorator.
"""

from __future__ import annotations
