"""Adapters and personalisation on a frozen model (the LoRA family, DreamBooth, Textual Inversion; chapters 11-12)."""
