"""Recipes of chapter 2 (noise schedules).

Each recipe registers itself in ``diffkit.recipes.RECIPES`` with the ``recipe`` decorator.
"""

from __future__ import annotations
