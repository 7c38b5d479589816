"""Natural-image patches cut from the photographs that ship with scikit-image (no download).

The shapes world is flat colour with sharp edges and no texture; the blur study of chapter 8
needs images whose power reaches the highest spatial frequencies. These are the bundled
``skimage.data`` photographs, split by *image* (not by patch), so held-out patches come from
scenes the VAE never saw. Greyscale photographs are repeated over the three channels.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

# bundled with scikit-image (skimage/data/*.png|jpg), so they load offline
TRAIN_IMAGES = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                "retina", "camera", "brick", "grass", "moon", "page", "cell")
TEST_IMAGES = ("chelsea", "gravel", "coins")
SPLITS = {"train": TRAIN_IMAGES, "test": TEST_IMAGES}


def load_image(name: str) -> torch.Tensor:
    """One skimage.data photograph as a float tensor (3, H, W) in [-1, 1]."""
    import skimage.data

    if name not in TRAIN_IMAGES + TEST_IMAGES:
        raise ValueError(f"unknown image {name!r}; expected one of {TRAIN_IMAGES + TEST_IMAGES}")
    array = np.asarray(getattr(skimage.data, name)())
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    image = torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1).float()
    return image / 127.5 - 1


def natural_patches(n: int, *, size: int = 32, split: str = "train", seed: int = 0) -> torch.Tensor:
    """n random size x size crops (N, 3, size, size) in [-1, 1], drawn evenly over the split's
    images, each flipped left-right with probability 1/2; deterministic for a given seed."""
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if not isinstance(size, numbers.Integral) or isinstance(size, bool) or not 8 <= size <= 256:
        raise ValueError(f"size must be an integer in [8, 256], got {size!r}")
    g = torch.Generator().manual_seed(int(seed))
    names = SPLITS[split]
    which = torch.arange(n) % len(names)
    out = torch.empty(n, 3, size, size)
    for k, name in enumerate(names):
        image = load_image(name)
        idx = (which == k).nonzero().squeeze(1)
        top = torch.randint(0, image.shape[1] - size + 1, (len(idx),), generator=g)
        left = torch.randint(0, image.shape[2] - size + 1, (len(idx),), generator=g)
        flip = torch.rand(len(idx), generator=g) < 0.5
        for i, y, x, f in zip(idx.tolist(), top.tolist(), left.tolist(), flip.tolist()):
            crop = image[:, y:y + size, x:x + size]
            out[i] = crop.flip(2) if f else crop
    return out[torch.randperm(n, generator=g)]
