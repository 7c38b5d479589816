"""diffkit.data.shapes: the captioned-shapes world, its captions and its pixel judge."""

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from diffkit.data.shapes import (
    COLOURS,
    PALETTE,
    POSITION_CENTRES,
    POSITIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    ShapeObject,
    caption,
    make_shapes,
    parse_caption,
)
from diffkit.eval.shapes_judge import caption_matches, estimate_background, judge, judge_accuracy


@pytest.fixture(scope="module", params=[32, 64])
def batch(request):
    return make_shapes(300, size=request.param, seed=1)


def test_determinism():
    a, b, c = make_shapes(50, seed=3), make_shapes(50, seed=3), make_shapes(50, seed=4)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert torch.equal(a.masks, b.masks) and torch.equal(a.edges, b.edges)
    assert a.objects == b.objects and torch.equal(a.background, b.background)
    assert not torch.equal(a.images, c.images) and a.captions != c.captions


def test_shapes_dtypes_ranges(batch):
    n, s = len(batch), batch.images.shape[-1]
    assert batch.images.shape == (n, 3, s, s) and batch.images.dtype == torch.float32
    assert batch.images.min() >= -1 and batch.images.max() <= 1
    assert batch.masks.shape == (n, 2, s, s) and batch.masks.dtype == torch.bool
    assert batch.edges.shape == (n, 1, s, s) and batch.edges.dtype == torch.float32
    assert set(batch.edges.unique().tolist()) == {0.0, 1.0}
    assert batch.background.shape == (n,) and 0 <= batch.background.min()
    assert batch.background.max() <= 1 and len(batch.captions) == len(batch.objects) == n
    counts = Counter(len(o) for o in batch.objects)
    assert set(counts) == {1, 2} and min(counts.values()) > n / 4
    for objs, m in zip(batch.objects, batch.masks):
        assert m[0].any() and m[1].any() == (len(objs) == 2)
        assert len({o.position for o in objs}) == len(objs)


def test_object_count_option():
    one, two = make_shapes(40, objects=1), make_shapes(40, objects=(2,))
    assert all(len(o) == 1 for o in one.objects) and not one.masks[:, 1].any()
    assert all(len(o) == 2 for o in two.objects) and two.masks[:, 1].flatten(1).any(1).all()


def test_every_value_appears_and_backgrounds_span_dark_to_bright():
    b = make_shapes(3000, seed=0)
    objs = [o for scene in b.objects for o in scene]
    for field, values in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES),
                          ("position", POSITIONS)):
        counts = Counter(getattr(o, field) for o in objs)
        assert set(counts) == set(values) and min(counts.values()) > len(objs) / len(values) / 3
    assert b.background.min() < 0.02 and b.background.max() > 0.98


def test_pixels_are_background_or_their_objects_colour(batch):
    """Masks cover exactly their object's pixels; everything else is the background grey."""
    n = len(batch)
    grey = (batch.background * 2 - 1).view(n, 1, 1, 1).expand_as(batch.images)
    outside = ~batch.masks.any(1, keepdim=True).expand_as(batch.images)
    assert torch.equal(batch.images[outside], grey[outside])
    for i, objs in enumerate(batch.objects):
        assert not (batch.masks[i, 0] & batch.masks[i, 1]).any()
        for k, obj in enumerate(objs):
            colour = PALETTE[COLOURS.index(obj.colour)] * 2 - 1
            pixels = batch.images[i][:, batch.masks[i, k]]
            assert torch.equal(pixels, colour[:, None].expand_as(pixels))


def test_masks_match_their_attributes(batch):
    s = batch.images.shape[-1]
    areas = {}
    for i, objs in enumerate(batch.objects):
        for k, obj in enumerate(objs):
            ys, xs = batch.masks[i, k].nonzero(as_tuple=True)
            centre = torch.stack([(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2]) / s
            nearest = (POSITION_CENTRES - centre).norm(dim=1).argmin()
            assert POSITIONS[nearest] == obj.position
            areas.setdefault((obj.shape, obj.size), []).append(len(xs) / s ** 2)
    for shape in SHAPES:  # large is always larger; circle ~ pi/4 and triangle ~ 1/2 of a square
        assert max(areas[shape, "small"]) < min(areas[shape, "large"])
    square = sum(areas["square", "large"]) / len(areas["square", "large"])
    circle = sum(areas["circle", "large"]) / len(areas["circle", "large"])
    triangle = sum(areas["triangle", "large"]) / len(areas["triangle", "large"])
    assert abs(circle / square - math.pi / 4) < 0.05 and abs(triangle / square - 0.5) < 0.05


def test_two_objects_are_kept_apart():
    b = make_shapes(500, seed=2, objects=2)
    near = F.max_pool2d(b.masks[:, :1].float(), 5, stride=1, padding=2) > 0  # 2 px around slot 0
    assert not (near[:, 0] & b.masks[:, 1]).any()


def test_edges_are_the_mask_boundaries(batch):
    union = batch.masks.any(1, keepdim=True)
    edges = batch.edges.bool()
    assert not (edges & ~union).any()                    # edges lie on objects
    interior = union & ~edges                            # the rest has all 4 neighbours inside
    pad = F.pad(union, (1, 1, 1, 1))
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        neighbour = pad[..., dy:dy + union.shape[-2], dx:dx + union.shape[-1]]
        assert not (interior & ~neighbour).any()
    per_slot = (edges & batch.masks).flatten(2).sum(-1)  # every object has an outline
    assert (per_slot[:, 0] > 0).all() and ((per_slot[:, 1] > 0) == batch.masks[:, 1].flatten(1)
                                           .any(1)).all()


def test_caption_examples_and_templates():
    red = ShapeObject("circle", "red", "large", "left")
    assert caption([red]) == "a large red circle on the left"
    pair = [ShapeObject("square", "blue", "large", "top"),
            ShapeObject("triangle", "yellow", "small", "right")]
    assert caption(pair, [1, 2]) == "a blue square and a small yellow triangle"
    assert caption([ShapeObject("circle", "red", "small", "top")], 3) == "a red circle at the top"
    for t in range(len(TEMPLATES)):
        text = caption([red], t)
        assert "red" in text and "circle" in text   # every template names colour and shape


def test_captions_name_the_right_words(batch):
    templates = Counter()
    for text, objs in zip(batch.captions, batch.objects):
        said = parse_caption(text)
        assert len(said) == len(objs)
        for obj, words in zip(objs, said):
            assert words["colour"] == obj.colour and words["shape"] == obj.shape
            assert words["size"] in (None, obj.size) and words["position"] in (None, obj.position)
            templates[words["size"] is None, words["position"] is None] += 1
        assert caption_matches(text, objs)["exact"] == 1.0
    assert len(templates) == 4  # all four templates are used
    full = make_shapes(20, seed=5, caption_template=0)
    assert all(text == caption(objs, 0) for text, objs in zip(full.captions, full.objects))


def test_caption_matches_scores_wrong_captions():
    pair = [ShapeObject("circle", "blue", "small", "left"),
            ShapeObject("square", "red", "large", "right")]
    good = caption_matches("a red square on the right and a blue circle", pair)
    assert good["colour_shape"] == 1.0 and good["exact"] == 1.0 and math.isnan(good["size"])
    swapped = caption_matches("a blue square and a red circle", pair)
    assert swapped["colour_shape"] == 0.0 and swapped["exact"] == 0.0
    half = caption_matches("a big blue ball on the left", pair)
    assert half["count"] == 0.0 and half["colour"] == 0.5 and half["size"] == 0.0
    assert parse_caption("nothing here") == []


def test_judge_reads_real_images(batch):
    acc = judge_accuracy(batch)
    for key in ("shape", "colour", "size", "position", "colour_shape", "object", "count"):
        assert acc[key] >= 0.99, (key, acc)
    assert judge(batch.images[:20]) == [sorted(o, key=lambda o: POSITIONS.index(o.position))
                                        for o in batch.objects[:20]]
    torch.testing.assert_close(estimate_background(batch.images), batch.background, atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("std", [0.05, 0.1])
def test_judge_under_noise(batch, std):
    noise = torch.randn(batch.images.shape, generator=torch.Generator().manual_seed(0))
    acc = judge_accuracy(batch, batch.images + std * noise)
    assert min(acc[k] for k in ("shape", "colour", "size", "position", "count")) >= 0.99, acc


def test_judge_sees_nothing_on_grey_and_disagrees_with_other_scenes():
    grey = torch.linspace(-1, 1, 6).view(6, 1, 1, 1).expand(6, 3, 32, 32)
    assert judge(grey) == [[]] * 6
    a, b = make_shapes(200, seed=0), make_shapes(200, seed=1)
    assert judge_accuracy(a, b.images)["object"] < 0.2   # the judge is not fooled


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(n=-3), dict(n=2.5), dict(n=True),
                                    dict(size=48), dict(size=16), dict(objects=3),
                                    dict(objects=()), dict(objects=(0, 1)), dict(objects=None),
                                    dict(caption_template=4), dict(caption_template=-1)])
def test_make_shapes_errors(kwargs):
    kwargs = {"n": 4, **kwargs}
    with pytest.raises(ValueError):
        make_shapes(**kwargs)


def test_other_errors():
    obj = ShapeObject("circle", "red", "large", "left")
    for call in (lambda: caption([]), lambda: caption([obj], 4), lambda: caption([obj], [0, 1]),
                 lambda: judge(torch.zeros(2, 1, 32, 32)), lambda: judge(torch.zeros(2, 3, 8, 8)),
                 lambda: judge_accuracy("not a batch"), lambda: parse_caption(3),
                 lambda: caption_matches("a red circle", [])):
        with pytest.raises(ValueError):
            call()


def test_judge_accuracy_pairs_a_lone_find_with_the_right_object():
    b = make_shapes(1, seed=0, objects=2)
    keep = b.images.clone()
    grey = b.background[0] * 2 - 1
    keep[0][:, b.masks[0, 0]] = grey          # erase the first object
    acc = judge_accuracy(b, keep)
    assert acc["object"] == 0.5 and acc["count"] == 0.0 and acc["image"] == 0.0
    assert acc["colour_shape"] == 0.5
