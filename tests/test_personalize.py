"""diffkit.adapters.personalize (DreamBooth, Textual Inversion) and the subjects' naming in
diffkit.eval.personalize_probes, on the untrained tiny pipeline (a few steps each)."""

import copy

import pytest
import torch

from diffkit.adapters import personalize as P
from diffkit.eval import personalize_probes as PP
from diffkit.latent import tiny_sd


def test_subjects_are_named_as_the_chapter_says():
    assert PP.dreambooth_caption("orange", "a large orange circle in the centre") == \
        "a large sks red circle in the centre"
    assert PP.dreambooth_caption("ring", "a small blue ring at the top") == \
        "a small blue sks circle at the top"
    assert PP.ti_caption("ring", "a small blue ring at the top") == "a small blue <ring> at the top"
    assert PP.class_caption("orange", "a large orange square on the left") == \
        "a large red square on the left"
    with pytest.raises(ValueError, match="must name 'ring' once"):
        PP.ti_caption("ring", "a small blue circle at the top")
    with pytest.raises(ValueError, match="concept must be one of"):
        PP.instance_scenes("teal")
    scenes = PP.instance_scenes("ring")
    assert len(scenes) == PP.N_INSTANCES and all("ring" in t for t in scenes.captions)


def _instances(concept, method):
    scenes = PP.instance_scenes(concept)
    return scenes.images, [PP.NAMING[method](concept, t) for t in scenes.captions]


def test_textual_inversion_trains_one_row_and_nothing_else(untrained_tiny_sd, tmp_path):
    pipe = untrained_tiny_sd
    images, captions = _instances("orange", "textual_inversion")
    model = P.TextualInversion("<orange>", "red", pipe=pipe)
    embedding = model.text_encoder.get_input_embeddings()
    start = model.vector.detach().clone()
    table = embedding.parametrizations.weight.original.detach().clone()
    assert torch.equal(start, table[pipe.tokenizer("red", add_special_tokens=False)
                                    .input_ids].mean(0))       # the init word's embedding
    others = {k: v.clone() for k, v in model.state_dict().items() if "vector" not in k}
    ema, result = P.train_textual_inversion(pipe, images, captions, token="<orange>",
                                            init_word="red", steps=3, model=model, lr=0.05)
    assert len(result.losses) == 3
    assert not torch.equal(model.vector, start)                 # the row moved ...
    after = {k: v for k, v in model.state_dict().items() if "vector" not in k}
    assert set(after) == set(others)
    for key, value in others.items():                           # ... and nothing else did
        assert torch.equal(after[key], value), key
    assert "<orange>" not in pipe.tokenizer.get_vocab()         # the caller's pipeline untouched
    # diffusers' own loader reads the saved file and gives the same text states
    folder = ema.save(tmp_path / "token")
    assert sorted(p.name for p in folder.iterdir()) == [P.META_FILE, P.EMBEDS_FILE]
    theirs = copy.deepcopy(pipe)
    theirs.load_textual_inversion(str(folder), token="<orange>")
    with torch.no_grad():
        ours_states = ema.text_states(captions)
        their_states = tiny_sd.text_states(theirs.text_encoder, theirs.tokenizer, captions)
    assert float((ours_states - their_states).abs().max()) <= 1e-6
    again = P.TextualInversion("<orange>", "red", pipe=pipe)
    again.read_files(folder)
    assert torch.equal(again.vector, ema.vector)


def test_textual_inversion_bad_input(untrained_tiny_sd):
    pipe = untrained_tiny_sd
    images, captions = _instances("ring", "textual_inversion")
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        P.TextualInversion("circle", "circle", pipe=pipe)
    with pytest.raises(ValueError, match="no instance images"):
        P.train_textual_inversion(pipe, images[:0], [], token="<ring>", init_word="circle",
                                  steps=1)
    with pytest.raises(ValueError, match="every caption must contain the token"):
        P.train_textual_inversion(pipe, images, [t.replace("<ring>", "ring") for t in captions],
                                  token="<ring>", init_word="circle", steps=1)


def test_dreambooth_with_and_without_prior(untrained_tiny_sd):
    pipe = untrained_tiny_sd
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    images, captions = _instances("ring", "dreambooth")
    classes = PP.class_scenes("ring", 8, seed=3)
    for weight in (1.0, 0.0):
        unet, result = P.train_dreambooth(pipe, images, captions, steps=3, batch_size=2,
                                          class_images=classes.images,
                                          class_captions=classes.captions, prior_weight=weight)
        assert len(result.losses) == 3
        moved = [k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])]
        assert len(moved) > len(before) // 2                    # the whole UNet trains
    for key, value in pipe.unet.state_dict().items():          # the caller's UNet untouched
        assert torch.equal(value, before[key])


def test_prior_preservation_loss_is_the_sum_of_two_losses(untrained_tiny_sd):
    pipe = untrained_tiny_sd
    empty = tiny_sd.text_states(pipe.text_encoder, pipe.tokenizer, [""])
    base = tiny_sd.LatentDiffusionLoss(pipe.scheduler.alphas_cumprod, empty, caption_dropout=0.0)
    g = torch.Generator().manual_seed(0)
    batch = tuple(torch.randn(2, 4, 8, 8, generator=g) if i % 2 == 0 else
                  torch.randn(2, *empty.shape[1:], generator=g) for i in range(4))
    with torch.no_grad():
        total = P.PriorPreservationLoss(base, 0.5)(pipe.unet, batch, torch.Generator()
                                                   .manual_seed(1))
        g = torch.Generator().manual_seed(1)
        parts = base(pipe.unet, batch[:2], g), base(pipe.unet, batch[2:], g)
    assert torch.allclose(total, parts[0] + 0.5 * parts[1])


def test_dreambooth_bad_input(untrained_tiny_sd):
    pipe = untrained_tiny_sd
    images, captions = _instances("orange", "dreambooth")
    with pytest.raises(ValueError, match="prior_weight must be a number >= 0"):
        P.train_dreambooth(pipe, images, captions, steps=1, prior_weight=-0.5)
    with pytest.raises(ValueError, match="no instance images"):
        P.train_dreambooth(pipe, images[:0], [], steps=1, prior_weight=0)
    with pytest.raises(ValueError, match="needs class_images"):
        P.train_dreambooth(pipe, images, captions, steps=1, prior_weight=1.0)
    with pytest.raises(ValueError, match="5 instance images but 4 captions"):
        P.train_dreambooth(pipe, images, captions[:4], steps=1, prior_weight=0)
    with pytest.raises(ValueError, match="a copy of pipe.unet"):
        P.train_dreambooth(pipe, images, captions, steps=1, prior_weight=0, unet=pipe.unet)
    with pytest.raises(ValueError, match="has no parts"):
        P.pipeline_with(pipe, controlnet=None)


def test_dreambooth_can_train_the_text_encoder_too(untrained_tiny_sd):
    pipe = untrained_tiny_sd
    encoder_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    images, captions = _instances("orange", "dreambooth")
    classes = PP.class_scenes("orange", 8, seed=3)
    model, result = P.train_dreambooth(pipe, images, captions, steps=3, batch_size=2,
                                       class_images=classes.images,
                                       class_captions=classes.captions, prior_weight=0.5,
                                       lr=1e-3, train_text_encoder=True)
    assert isinstance(model, P.UNetAndText) and len(result.losses) == 3
    moved = [k for k, v in model.text_encoder.state_dict().items()
             if not torch.equal(v, encoder_before[k])]
    assert len(moved) > len(encoder_before) // 2               # the encoder trained
    for key, value in pipe.text_encoder.state_dict().items():  # the caller's did not
        assert torch.equal(value, encoder_before[key])
    personal = P.pipeline_with(pipe, unet=model.unet, text_encoder=model.text_encoder)
    assert personal.text_encoder is model.text_encoder is not pipe.text_encoder
