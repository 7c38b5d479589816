"""diffkit.eval.sd_probes on scenes whose answers are known (the true images), and the reports
run end to end on an untrained tiny pipeline (their figures are then near chance)."""

import pytest
import torch

from diffkit.data.shapes import make_shapes
from diffkit.eval import sd_probes


def test_binding_on_true_and_swapped_images():
    scenes = sd_probes.prompt_scenes(200, 2)
    right = sd_probes.binding(scenes, scenes.images)
    assert right["both_right"] >= 0.98 and right["binding"] >= 0.98 and right["binding_n"] > 50
    # swap the two objects' colours: the words are all there, their pairing is wrong
    swapped = scenes.images.clone()
    for i, (a, b) in enumerate(zip(scenes.masks[:, 0], scenes.masks[:, 1])):
        colour_a = scenes.images[i][:, a][:, :1].clone()
        colour_b = scenes.images[i][:, b][:, :1].clone()
        swapped[i][:, a] = colour_b
        swapped[i][:, b] = colour_a
    wrong = sd_probes.binding(scenes, swapped)
    assert wrong["binding"] <= 0.05 and wrong["binding_n"] >= 0.9 * right["binding_n"]
    with pytest.raises(ValueError, match="two-object"):
        sd_probes.binding(sd_probes.prompt_scenes(4, 1), scenes.images[:4])


def test_outline_spread():
    one = make_shapes(1, seed=3, objects=1).images
    same = sd_probes.outline_spread(one.expand(4, -1, -1, -1))
    assert same["mean_iou"] == same["min_iou"] == 1.0 and same["centre_spread_px"] == 0.0
    varied = sd_probes.outline_spread(make_shapes(8, seed=3, objects=1).images)
    assert varied["mean_iou"] < 0.5 and varied["centre_spread_px"] > 3
    with pytest.raises(ValueError, match="at least two images"):
        sd_probes.outline_spread(one)


@pytest.fixture(scope="module")
def pipe(untrained_tiny_sd):
    return untrained_tiny_sd


def test_reports_run_on_an_untrained_pipeline(pipe):
    figures = sd_probes.attribute_report(pipe, n=6, steps=2, guidance_scale=2.0)
    assert {"colour_shape_1obj", "shape_1obj", "both_right_2obj", "binding_2obj",
            "count_2obj"} <= figures.keys()
    report, inputs, prompts, outputs = sd_probes.img2img_report(
        pipe, [0.5, 1.0], n=4, steps=4, guidance_scale=2.0)
    assert set(report) == {0.5, 1.0} and outputs[1.0].shape == (4, 3, 32, 32)
    assert {"input", "prompt", "input_colour", "input_shape", "prompt_colour", "prompt_shape",
            "rms"} == set(report[0.5])
    for truth, other in zip(inputs.objects, prompts.objects):   # the prompt differs
        assert truth[0].colour != other[0].colour and truth[0].shape != other[0].shape
    scenes = sd_probes.prompt_scenes(3, 1)
    images, maps, words = sd_probes.word_attention(pipe, scenes, steps=2, guidance_scale=2.0)
    assert maps.shape[:2] == (2, 3) and images.shape == (3, 3, 32, 32)
    assert {"inside_colour", "inside_shape", "inside_size", "inside_position", "area"} <= set(
        words)
    _, middle, _ = sd_probes.word_attention(pipe, scenes, steps=2, guidance_scale=2.0, size=4)
    assert middle.shape[-2:] == (4, 4)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        sd_probes.generate(pipe, ["a red circle"], steps=2, guidance_scale=1.0, batch=0)


def test_shape_accuracy_reads_true_scenes():
    scenes = sd_probes.prompt_scenes(120, 1)
    table = sd_probes.shape_accuracy(scenes, scenes.images)
    assert all(table[s][s] >= 0.97 for s in table)
    blank = torch.zeros_like(scenes.images)
    assert all(row["none"] == 1.0 for row in sd_probes.shape_accuracy(scenes, blank).values())
    with pytest.raises(ValueError, match="one-object"):
        sd_probes.shape_accuracy(sd_probes.prompt_scenes(3, 2), scenes.images[:3])
