"""Text and image-text encoders of the captioned-shapes world: the tiny CLIP, BLIP and BLIP-2."""
