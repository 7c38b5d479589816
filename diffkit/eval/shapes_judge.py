"""The pixel judge of the captioned-shapes world: attributes read back from images alone.

The judge never sees the generator's choices. It (1) marks as object every pixel far from the
grey axis r = g = b (chroma above half the palette's), whatever the background brightness;
(2) gives each such pixel the palette colour of nearest hue (the hexagonal hue of HSV);
(3) groups object pixels into 8-connected blobs and splits each blob by colour, dropping
specks; (4) reads each part's shape from how deep its centre of mass sits in its bounding box
(a triangle pointing up: 2/3 down, a circle or square: 1/2) and how it fills the box (circle
pi/4, square 1), its size from the box side its area implies, and its position from the box
centre. Given the concept vocabularies (``colours`` with orange, ``shapes`` with ring) it also
reads the new colour (nearest hue among the vocabulary's) and the ring (a part with a hole
inside it, or one filling its box much less than a disc). It scores text-to-image samples
(tiny Stable Diffusion, ControlNet) against their prompts; ``caption_matches`` scores
captions (BLIP) against the true objects.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from scipy import ndimage

from diffkit.data.shapes import (
    ALL_COLOURS,
    ALL_SHAPES,
    COLOURS,
    HALF_EXTENT,
    POSITION_CENTRES,
    POSITIONS,
    RGB,
    RING_INNER,
    SHAPES,
    SIZES,
    ShapeObject,
    ShapesBatch,
    parse_caption,
)

_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5,      # area / box, per shape
         "ring": math.pi / 4 * (1 - RING_INNER ** 2)}
# a ring fills its box by 0.55 (a disc 0.79): between the two, and a hole of a few pixels
_RING_FILL_SPLIT = (_FILL["circle"] + _FILL["ring"]) / 2
_RING_HOLE_PIXELS = 3
# side threshold between small and large: geometric mean of their box sides
_SIDE_SPLIT = 2 * math.sqrt(HALF_EXTENT[0] * HALF_EXTENT[1])


def _check_images(images: torch.Tensor) -> None:
    if (not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3
            or images.shape[2] != images.shape[3] or images.shape[2] < 16
            or not images.is_floating_point()):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (N, 3, S, S) in [-1, 1] with S >= 16, "
                         f"got {got}")


_EIGHT = np.ones((3, 3, 3), dtype=bool)   # 8-connectivity inside an image, none across images
_EIGHT[0] = _EIGHT[2] = False
_CENTRES = POSITION_CENTRES.tolist()


def _angle(r, g, b):
    # the chroma plane's coordinates (2r - g - b) / 2 and sqrt(3) (g - b) / 2 put red at 0
    # degrees and the six palette colours 60 degrees apart, in the order of COLOURS
    a, c = (2 * r - g - b) / 2, math.sqrt(3) / 2 * (g - b)
    return np.arctan2(c, a), np.hypot(a, c)


def _hue_and_chroma(images: torch.Tensor, colours=COLOURS) -> tuple[np.ndarray, np.ndarray]:
    """Index into ``colours`` of the nearest hue (N, S, S) and chroma relative to the
    palette's (N, S, S)."""
    _check_images(images)
    r, g, b = images.detach().float().cpu().numpy().transpose(1, 0, 2, 3)
    angle, chroma = _angle(r, g, b)
    if tuple(colours) == COLOURS:        # the six palette hues: 60-degree bins
        hue = np.rint(angle / (math.pi / 3)).astype(np.int64) % len(COLOURS)
    else:
        if not set(colours) <= set(ALL_COLOURS):
            raise ValueError(f"colours must be words of {ALL_COLOURS}, got {colours!r}")
        targets = np.array([_angle(*(2 * np.array(RGB[c]) - 1))[0] for c in colours])
        gap = np.angle(np.exp(1j * (angle[..., None] - targets)))     # wrapped to (-pi, pi]
        hue = np.abs(gap).argmin(-1)
    return hue, chroma / 2   # a palette colour in [-1, 1] has chroma 2 here -> 1


@torch.no_grad()
def foreground(images: torch.Tensor, *, chroma_threshold: float = 0.5) -> torch.Tensor:
    """The pixels the judge counts as object (N, S, S), bool: chroma above the threshold's
    fraction of the palette's."""
    return torch.from_numpy(_hue_and_chroma(images)[1] > chroma_threshold)


def judge(images: torch.Tensor, *, min_area: float | None = None, chroma_threshold: float = 0.5,
          shapes=SHAPES, colours=COLOURS) -> list[list[ShapeObject]]:
    """Objects seen in images (N, 3, S, S) in [-1, 1]: one list of ShapeObject per image.

    min_area: fewest pixels an object may have (default: a third of the smallest true object,
    so noise specks are ignored); chroma_threshold: fraction of the palette's chroma from which a
    pixel counts as an object. At most four objects per image (the largest), in POSITIONS order.
    shapes, colours: the vocabularies read (the base world's by default; add "ring" / "orange"
    for the concepts of chapters 11 and 12).
    """
    shapes, colours = tuple(shapes), tuple(colours)
    if not set(shapes) <= set(ALL_SHAPES) or not {"circle", "square", "triangle"} <= set(shapes):
        raise ValueError(f"shapes must hold the base shapes and words of {ALL_SHAPES}, "
                         f"got {shapes!r}")
    hue, chroma = _hue_and_chroma(images, colours)
    n, s, _ = hue.shape
    if min_area is None:
        min_area = 0.5 * (2 * HALF_EXTENT[0] * s) ** 2 / 3  # smallest true object: a small triangle
    fg = chroma > chroma_threshold
    blobs, count = ndimage.label(fg, structure=_EIGHT)
    # split each blob by colour, so touching objects of different colours come apart
    key = np.where(fg, blobs * len(colours) + hue + 1, 0)
    used = np.zeros((count + 1) * len(colours) + 1, dtype=np.int64)
    used[key.ravel()] = 1
    parts = (np.cumsum(used) - 1)[key]       # consecutive ids, 0 stays background
    area = np.bincount(parts.ravel())
    rows = np.broadcast_to(np.arange(s, dtype=np.float64)[None, :, None], hue.shape).ravel()
    row_sum = np.bincount(parts.ravel(), weights=rows)
    colour = np.zeros(len(area), dtype=np.int64)
    colour[parts.ravel()] = hue.ravel()
    found: list[list[tuple]] = [[] for _ in range(n)]
    for k, box in enumerate(ndimage.find_objects(parts), start=1):
        if box is None or area[k] < min_area:
            continue
        (i, _), (y0, y1), (x0, x1) = [(b.start, b.stop) for b in box]
        h, w = y1 - y0, x1 - x0
        depth = (row_sum[k] / area[k] + 0.5 - y0) / h   # a triangle 2/3, a circle or square 1/2
        fill = area[k] / (h * w)
        if depth > 7 / 12:
            shape = "triangle"
        elif "ring" in shapes and (fill < _RING_FILL_SPLIT or _hole(parts[box] == k)):
            shape = "ring"
        else:
            shape = "square" if fill > 0.95 else "circle"
        side = math.sqrt(area[k] / _FILL[shape]) / s   # the box side the area implies
        u, v = (x0 + x1) / 2 / s, (y0 + y1) / 2 / s
        position = min(range(len(POSITIONS)), key=lambda p: (_CENTRES[p][0] - u) ** 2
                       + (_CENTRES[p][1] - v) ** 2)
        found[i].append((area[k], ShapeObject(shape, colours[colour[k]],
                                              SIZES[side > _SIDE_SPLIT], POSITIONS[position])))
    return [sorted((o for _, o in sorted(f, key=lambda t: -t[0])[:4]),
                   key=lambda o: POSITIONS.index(o.position)) for f in found]


def _hole(part: np.ndarray) -> bool:
    """Whether a part's mask (1, h, w) encloses at least _RING_HOLE_PIXELS background pixels."""
    return int(ndimage.binary_fill_holes(part[0]).sum() - part[0].sum()) >= _RING_HOLE_PIXELS


def estimate_background(images: torch.Tensor, *, chroma_threshold: float = 0.5) -> torch.Tensor:
    """Background grey level (N,) in [0, 1]: mean brightness of the pixels judged background."""
    _, chroma = _hue_and_chroma(images)
    grey = (images.detach().float().cpu().mean(1) + 1) / 2
    bg = torch.from_numpy(chroma <= chroma_threshold).float()
    return (grey * bg).sum((1, 2)) / bg.sum((1, 2)).clamp(min=1)


ATTRIBUTES = ("shape", "colour", "size", "position")


def judge_accuracy(batch: ShapesBatch, images: torch.Tensor | None = None, *, shapes=SHAPES,
                   colours=COLOURS) -> dict[str, float]:
    """Agreement of judge(images) (default batch.images) with the batch's true objects.

    Judged and true objects are paired per image in the order that agrees best. Returns the
    fraction of true objects whose shape / colour / size / position is read right,
    "colour_shape" (both of those right), "object" (all four right), "count" (images with the right number of objects) and "image" (count and every
    object right). Pass generated images to score a conditional generator against its prompts,
    and the concept vocabularies (``judge``'s shapes / colours) to read orange and rings.
    """
    if not isinstance(batch, ShapesBatch):
        raise ValueError(f"batch must be a ShapesBatch, got {type(batch).__name__}")
    seen = judge(batch.images if images is None else images, shapes=shapes, colours=colours)
    if len(seen) != len(batch.objects):
        raise ValueError(f"images hold {len(seen)} scenes but the batch {len(batch.objects)}")
    right = dict.fromkeys(ATTRIBUTES + ("colour_shape", "object"), 0)
    count = image = total = 0
    for truth, found in zip(batch.objects, seen):
        best = None
        padded = found + [None] * max(0, len(truth) - len(found))  # None: an object missed
        for order in itertools.permutations(padded, len(truth)):
            hits = [[f is not None and getattr(t, a) == getattr(f, a) for a in ATTRIBUTES]
                    for t, f in zip(truth, order)]
            if best is None or sum(map(sum, hits)) > sum(map(sum, best)):
                best = hits
        for hit in best:
            for a, h in zip(ATTRIBUTES, hit):
                right[a] += h
            right["colour_shape"] += hit[0] and hit[1]
            right["object"] += all(hit)
        total += len(truth)
        count += len(found) == len(truth)
        image += len(found) == len(truth) and sum(map(all, best)) == len(truth)
    out = {k: v / total for k, v in right.items()}
    out.update(count=count / len(seen), image=image / len(seen))
    return out


def caption_matches(text: str, objects) -> dict[str, float]:
    """How well a caption describes a scene's true objects (order-free).

    Returns fractions over the true objects: "colour", "shape", "colour_shape" (both right);
    "size" and "position" over the objects whose caption names them (nan when none does);
    "count" (1.0 when the caption describes as many objects as there are) and "exact" (1.0 when
    the count is right and every attribute the caption names is right).
    """
    said, objects = parse_caption(text), list(objects)
    if not objects:
        raise ValueError("objects must hold at least one ShapeObject")
    best = None
    k = min(len(said), len(objects))
    for pairs in (list(zip(o, p)) for o in itertools.permutations(objects, k)
                  for p in itertools.permutations(said[:4], k)):  # the best pairing
        ok = {k: [getattr(o, k) == s[k] for o, s in pairs] for k in ("colour", "shape")}
        named = {k: [getattr(o, k) == s[k] for o, s in pairs if s[k] is not None]
                 for k in ("size", "position")}
        score = sum(map(sum, ok.values())) + sum(map(sum, named.values()))
        if best is None or score > best[0]:
            best = (score, ok, named, pairs)
    _, ok, named, pairs = best
    n = len(objects)
    both = sum(a and b for a, b in zip(ok["colour"], ok["shape"]))
    out = {"colour": sum(ok["colour"]) / n, "shape": sum(ok["shape"]) / n, "colour_shape": both / n}
    for k in ("size", "position"):
        out[k] = sum(named[k]) / len(named[k]) if named[k] else float("nan")
    out["count"] = float(len(said) == n)
    out["exact"] = float(out["count"] == 1.0 and both == n
                         and all(all(v) for v in named.values()))
    return out
