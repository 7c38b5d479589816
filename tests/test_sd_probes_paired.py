"""sd_probes.subset, per_image and paired_gap: per-prompt outcomes of the shapes judge."""

import pytest
import torch

from diffkit.eval import sd_probes


def test_subset_keeps_the_rows_of_every_field():
    scenes = sd_probes.prompt_scenes(6, 1)
    part = sd_probes.subset(scenes, [4, 1])
    assert part.captions == [scenes.captions[4], scenes.captions[1]]
    assert torch.equal(part.images, scenes.images[[4, 1]])
    assert part.objects == [scenes.objects[4], scenes.objects[1]]
    assert torch.equal(part.masks, scenes.masks[[4, 1]])


def test_per_image_reads_real_scenes_right_and_noise_wrong():
    scenes = sd_probes.prompt_scenes(12, 1)
    assert sd_probes.per_image(scenes, scenes.images).tolist() == [1.0] * 12
    flat = torch.zeros_like(scenes.images)               # no object anywhere
    assert sd_probes.per_image(scenes, flat).sum() == 0


def test_per_image_two_objects_both_right():
    scenes = sd_probes.prompt_scenes(10, 2)
    both = sd_probes.per_image(scenes, scenes.images, "both_right")
    assert both.mean() > 0.9                            # the judge reads real scenes right
    swapped = torch.cat([scenes.images[1:], scenes.images[:1]])
    assert sd_probes.per_image(scenes, swapped, "both_right").mean() < both.mean()


def test_paired_gap_of_truth_against_blank():
    scenes = sd_probes.prompt_scenes(20, 1)
    gap = sd_probes.paired_gap(scenes, scenes.images, torch.zeros_like(scenes.images))
    assert gap["gap"] == 1.0 and gap["se"] == 0.0
    same = sd_probes.paired_gap(scenes, scenes.images, scenes.images)
    assert same == {"gap": 0.0, "se": 0.0}


def test_per_image_needs_one_image_per_scene():
    scenes = sd_probes.prompt_scenes(4, 1)
    with pytest.raises(ValueError, match="4 scenes"):
        sd_probes.per_image(scenes, scenes.images[:3])
