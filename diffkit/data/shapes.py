"""The captioned-shapes world: procedural text-image pairs with exact attributes, masks and edges.

One or two flat-coloured shapes (circle, square, triangle) on a uniform grey background whose
brightness runs from black to white. Each object has a shape, a colour, a size and a position;
the caption names them in English. Because every attribute is known exactly, and
``diffkit.eval.shapes_judge.judge`` recovers them from pixels alone, the world is the text-to-image
test bed of the book: CLIP and BLIP learn it, tiny Stable Diffusion draws it, ControlNet is
conditioned on its edges and masks, and the judge scores what they produce.

Why these colours: the six palette colours are the fully saturated primaries and secondaries.
Each lies at the same distance sqrt(2/3) (in [0, 1] RGB) from the grey axis r = g = b, so every
object stands out from every background brightness by its chroma alone, and the colours sit 60
degrees apart in hue, which is what the judge classifies.

Two concepts the base world never shows, for the fine-tuning chapters (11, 12): the colour
orange (RGB 1, 0.5, 0: hue 30 degrees, between red and yellow, chroma sqrt(3)/2 of the
palette's) and the shape ring (a hollow circle, inner radius RING_INNER of the outer). Scenes
with them are drawn by passing ``colours`` / ``shapes`` vocabularies to ``make_shapes``; with
the defaults the world is exactly the base one.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")  # hue order, 60 degrees apart
PALETTE = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0],
                        [0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 1.0]])  # RGB in [0, 1]
CONCEPT_COLOURS = ("orange",)
CONCEPT_SHAPES = ("ring",)
ALL_COLOURS, ALL_SHAPES = COLOURS + CONCEPT_COLOURS, SHAPES + CONCEPT_SHAPES
RGB = dict(zip(ALL_COLOURS, torch.cat([PALETTE, torch.tensor([[1.0, 0.5, 0.0]])]).tolist()))
RING_INNER = 0.55                        # inner radius of a ring / its outer radius
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
IMAGE_SIZES = (32, 64)

# geometry in units of the image side S (pixels at S = 32 in brackets)
OFFSET = 9 / 32                          # centre of a side position from the image centre (9)
HALF_EXTENT = (3.5 / 32, 6.0 / 32)       # half side of the bounding box: small (3.5), large (6)
JITTER = 0.75 / 32                       # uniform jitter of each centre, per axis (0.75)
POSITION_CENTRES = torch.tensor([[0.5 - OFFSET, 0.5], [0.5 + OFFSET, 0.5], [0.5, 0.5 - OFFSET],
                                 [0.5, 0.5 + OFFSET], [0.5, 0.5]])  # (x, y), y grows downwards
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "centre": "in the centre"}
# every template names colour and shape; size and position are left out by some, so a caption
# is informative but not always complete (CLIP must learn from partial descriptions)
TEMPLATES = ("{size} {colour} {shape} {position}", "{colour} {shape}",
             "{size} {colour} {shape}", "{colour} {shape} {position}")


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene: each field is a word of SHAPES, COLOURS, SIZES, POSITIONS."""
    shape: str
    colour: str
    size: str
    position: str


@dataclass
class ShapesBatch:
    """A batch of scenes.

    images (N, 3, S, S) float32 in [-1, 1]; captions: N strings; objects: N lists of 1-2
    ShapeObject; background (N,) grey level in [0, 1]; masks (N, 2, S, S) bool, one per object
    slot (all False where the scene has one object); edges (N, 1, S, S) float32 in {0, 1}: the
    inner boundary pixels of every object (the ControlNet condition).
    """
    images: torch.Tensor
    captions: list[str]
    objects: list[list[ShapeObject]]
    background: torch.Tensor
    masks: torch.Tensor
    edges: torch.Tensor

    def __len__(self) -> int:
        return len(self.captions)


def _check_objects(objects) -> tuple[int, ...]:
    try:
        counts = (objects,) if isinstance(objects, numbers.Integral) else tuple(objects)
    except TypeError:
        counts = ()
    if not counts or any(isinstance(c, bool) or c not in (1, 2) for c in counts):
        raise ValueError(f"objects must be 1, 2 or a tuple of them such as (1, 2), got {objects!r}")
    return tuple(sorted(set(int(c) for c in counts)))


def _rasterise(shape, half, centre, size):
    """Masks (..., S, S) of shape ids (...), half extents (...), centres (..., 2); units of S.

    A pixel belongs to a shape when its centre does (no anti-aliasing: masks are exact). The
    triangle points up and fills the lower half of its bounding box's area.
    """
    half_shape = shape.shape
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    shape, half, centre = shape.reshape(-1), half.reshape(-1), centre.reshape(-1, 2)
    out = torch.zeros(len(shape), size, size, dtype=torch.bool)
    for k in range(len(ALL_SHAPES)):  # each shape's test only on its own objects
        idx = (shape == k).nonzero().squeeze(1)
        u = grid.view(1, 1, -1) - centre[idx, 0, None, None]   # x offset, (M, 1, S)
        v = grid.view(1, -1, 1) - centre[idx, 1, None, None]   # y offset, (M, S, 1)
        h = half[idx, None, None]
        if k == 0:
            out[idx] = u ** 2 + v ** 2 <= h ** 2
        elif k == 1:
            out[idx] = (u.abs() <= h) & (v.abs() <= h)
        elif k == 2:  # the half width grows linearly from 0 at the apex to h at the base
            out[idx] = (v.abs() <= h) & (2 * u.abs() <= v + h)
        else:         # the ring: a disc with a disc of RING_INNER times its radius removed
            r2 = u ** 2 + v ** 2
            out[idx] = (r2 <= h ** 2) & (r2 > (RING_INNER * h) ** 2)
    return out.view(*half_shape, size, size)


def _dilate(mask: torch.Tensor, r: int) -> torch.Tensor:
    """Masks (M, S, S) grown by r pixels in the max (Chebyshev) norm: a separable OR of shifts."""
    for dim in (1, 2):
        grown, length = mask.clone(), mask.shape[dim]
        for shift in range(1, r + 1):
            keep = length - shift
            grown.narrow(dim, 0, keep).logical_or_(mask.narrow(dim, shift, keep))
            grown.narrow(dim, shift, keep).logical_or_(mask.narrow(dim, 0, keep))
        mask = grown
    return mask


def _draw(n, g, shapes=SHAPES, colours=COLOURS, anywhere=False):
    """Attributes (n, 2) of each slot (shape and colour: indices into the given vocabularies,
    size, position) and centres (n, 2, 2)."""
    shape = torch.randint(0, len(shapes), (n, 2), generator=g)
    colour = torch.randint(0, len(colours), (n, 2), generator=g)
    big = torch.randint(0, len(SIZES), (n, 2), generator=g)
    if anywhere:   # uniform over the places where the object fits; named by the nearest centre
        half = torch.tensor(HALF_EXTENT)[big][..., None]
        centre = half + torch.rand(n, 2, 2, generator=g) * (1 - 2 * half)
        position = ((centre[:, :, None] - POSITION_CENTRES) ** 2).sum(-1).argmin(-1)
        return shape, colour, big, position, centre
    first = torch.randint(0, len(POSITIONS), (n,), generator=g)
    # the second object takes one of the four other positions
    second = (first + torch.randint(1, len(POSITIONS), (n,), generator=g)) % len(POSITIONS)
    position = torch.stack([first, second], 1)
    jitter = (torch.rand(n, 2, 2, generator=g) * 2 - 1) * JITTER
    return shape, colour, big, position, POSITION_CENTRES[position] + jitter


def caption(objects, template: int | list[int] | tuple[int, ...] = 0) -> str:
    """English caption of a scene's objects; template: index into TEMPLATES, one or per object.

    >>> caption([ShapeObject("circle", "red", "large", "left")])
    'a large red circle on the left'
    """
    objects = list(objects)
    if not objects:
        raise ValueError("caption needs at least one object")
    one = isinstance(template, numbers.Integral)
    templates = [template] * len(objects) if one else list(template)
    if len(templates) != len(objects) or any(
            not isinstance(t, numbers.Integral) or not 0 <= t < len(TEMPLATES) for t in templates):
        raise ValueError(f"template must be an index in [0, {len(TEMPLATES)}) or one per object, "
                         f"got {template!r}")
    phrases = []
    for obj, t in zip(objects, templates):
        words = TEMPLATES[t].format(size=obj.size, colour=obj.colour, shape=obj.shape,
                                    position=POSITION_PHRASES[obj.position])
        phrases.append(("an " if words[0] in "aeiou" else "a ") + words)
    return " and ".join(phrases)


def _check_vocabulary(name: str, words, allowed) -> tuple[str, ...]:
    words = (words,) if isinstance(words, str) else tuple(words)
    if not words or len(set(words)) != len(words) or not set(words) <= set(allowed):
        raise ValueError(f"{name} must be distinct words of {allowed}, got {words!r}")
    return words


def make_shapes(n: int, *, size: int = 32, seed: int = 0, objects=(1, 2),
                caption_template: int | None = None, shapes=SHAPES,
                colours=COLOURS, anywhere: bool = False) -> ShapesBatch:
    """n scenes of the captioned-shapes world, deterministic for a given seed.

    size: image side (32 or 64). objects: 1, 2 or a tuple of allowed counts, drawn uniformly.
    caption_template: None draws a template of TEMPLATES per object; an index fixes it.
    shapes, colours: the vocabularies drawn from (uniformly), words of ALL_SHAPES / ALL_COLOURS;
    e.g. ``colours=("orange",)`` for scenes of the new colour only. anywhere: centres uniform
    over the frame (where the object fits) instead of the five named places, each object's
    position word the nearest named place (ControlNet's data: the layout the caption cannot say).
    Attributes are uniform and independent, except that a pair of objects whose masks would come
    within 2 px (4 px at 64) of each other is redrawn: two large objects then mostly sit in
    opposite positions, so two-object scenes lean to small objects and opposite positions.
    """
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if size not in IMAGE_SIZES or isinstance(size, bool):
        raise ValueError(f"size must be one of {IMAGE_SIZES}, got {size!r}")
    counts = _check_objects(objects)
    if caption_template is not None and (isinstance(caption_template, bool)
                                         or caption_template not in range(len(TEMPLATES))):
        raise ValueError(f"caption_template must be None or in [0, {len(TEMPLATES)}), "
                         f"got {caption_template!r}")
    shapes = _check_vocabulary("shapes", shapes, ALL_SHAPES)
    colours = _check_vocabulary("colours", colours, ALL_COLOURS)
    n, g = int(n), torch.Generator().manual_seed(int(seed))
    count_choice = torch.tensor(counts)[torch.randint(0, len(counts), (n,), generator=g)]
    draw = lambda m: _draw(m, g, shapes, colours, bool(anywhere))   # noqa: E731
    shape_ids = torch.tensor([ALL_SHAPES.index(w) for w in shapes])   # local -> global shape id
    shape, colour, big, position, centre = draw(n)
    two = count_choice == 2
    gap = 2 * round(2 * size / 32) + 1  # dilation kernel: the masks must stay this far apart
    todo = two.clone()
    for round_ in range(200):  # redraw touching pairs; each round redraws a shrinking subset
        if not todo.any():
            break
        idx = todo.nonzero().squeeze(1)
        if round_ > 0:
            s, c, b, p, ce = draw(len(idx))
            shape[idx], colour[idx], big[idx], position[idx], centre[idx] = s, c, b, p, ce
        half = torch.tensor(HALF_EXTENT)[big[idx]]
        # only pairs whose widened bounding boxes meet can touch: rasterise just those
        reach = half.sum(1) + (gap // 2 + 1) / size
        close = ((centre[idx, 0] - centre[idx, 1]).abs() < reach[:, None]).all(1)
        idx, half = idx[close], half[close]
        m = _rasterise(shape_ids[shape[idx]], half, centre[idx], size)
        todo[:] = False
        todo[idx] = (_dilate(m[:, 0], gap // 2) & m[:, 1]).flatten(1).any(1)
    else:
        raise RuntimeError("could not place two separated objects")  # pragma: no cover
    masks = _rasterise(shape_ids[shape], torch.tensor(HALF_EXTENT)[big], centre, size)
    masks[:, 1] &= two[:, None, None]
    background = torch.rand(n, generator=g)
    # paint through a per-image colour table: entry 0 the grey, 1 + k the k-th colour drawn from
    code = (colour + 1).to(torch.uint8)[:, :, None, None]
    paint = torch.where(masks[:, 0], code[:, 0], torch.where(masks[:, 1], code[:, 1], 0))
    rgb = torch.tensor([RGB[c] for c in colours]).t()
    table = torch.cat([background.view(n, 1, 1).expand(n, 3, 1),
                       rgb.expand(n, 3, len(colours))], 2)
    images = (table * 2 - 1).gather(2, paint.view(n, 1, -1).long().expand(n, 3, -1))
    images = images.view(n, 3, size, size)
    # edges: object pixels with a 4-neighbour outside their object (the inner boundary)
    pad = F.pad(masks, (1, 1, 1, 1))
    inner = pad[..., :-2, 1:-1] & pad[..., 2:, 1:-1] & pad[..., 1:-1, :-2] & pad[..., 1:-1, 2:]
    edges = (masks & ~inner).any(1, keepdim=True).float()
    templates = torch.randint(0, len(TEMPLATES), (n, 2), generator=g).tolist()
    objs, captions = [], []
    rows = zip(shape.tolist(), colour.tolist(), big.tolist(), position.tolist(),
               count_choice.tolist(), templates)
    for s, c, b, p, k, t in rows:
        scene = [ShapeObject(shapes[s[j]], colours[c[j]], SIZES[b[j]], POSITIONS[p[j]])
                 for j in range(k)]
        objs.append(scene)
        captions.append(caption(scene, t[:k] if caption_template is None else caption_template))
    return ShapesBatch(images, captions, objs, background, masks, edges)


_WORD = {w: kind for kind, words in (("shape", ALL_SHAPES), ("colour", ALL_COLOURS),
                                      ("size", SIZES), ("position", POSITIONS)) for w in words}
_SYNONYM = {"center": "centre", "middle": "centre", "big": "large", "little": "small"}


def parse_caption(text: str) -> list[dict[str, str | None]]:
    """The objects a caption describes, as dicts of shape, colour, size, position (None: unsaid).

    Splits on "and", commas and semicolons, and reads the first word of each kind in each part
    (with a few synonyms: "center", "middle", "big", "little"), so it also reads free-form text
    such as a captioner's output: "a big red ball" gives colour red, size large, no shape.
    """
    if not isinstance(text, str):
        raise ValueError(f"caption must be a string, got {type(text).__name__}")
    found = []
    for part in re.split(r"\band\b|,|;", text.lower()):
        words = re.findall(r"[a-z]+", part)
        obj: dict[str, str | None] = dict(shape=None, colour=None, size=None, position=None)
        for w in words:
            w = _SYNONYM.get(w, w)
            if w in _WORD and obj[_WORD[w]] is None:
                obj[_WORD[w]] = w
        if any(v is not None for v in obj.values()):
            found.append(obj)
    return found
