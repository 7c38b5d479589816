"""diffkit.adapters.finetune: the concept scenes and an adapter trained on a copy of the UNet."""

import pytest
import torch

from diffkit.adapters import finetune, lora
from diffkit.eval.shapes_judge import judge_accuracy


def test_concept_scenes_hold_the_concept():
    orange = finetune.concept_scenes("orange", 20, seed=1)
    assert all(o.colour == "orange" for scene in orange.objects for o in scene)
    ring = finetune.concept_scenes("ring", 20, seed=1)
    assert all(o.shape == "ring" for scene in ring.objects for o in scene)
    assert judge_accuracy(ring, **finetune.concept_vocabulary())["shape"] == 1.0
    with pytest.raises(ValueError, match="concept must be one of"):
        finetune.concept_scenes("purple", 4, seed=0)


def test_the_tokenizer_spells_a_new_word_in_pieces(untrained_tiny_sd):
    # no new token is needed: the byte-pair vocabulary has every letter
    tok = untrained_tiny_sd.tokenizer
    pieces = tok("orange", add_special_tokens=False).input_ids
    assert len(pieces) > 1 and tok.unk_token_id not in pieces
    assert tok.decode(pieces).replace(" ", "") == "orange"


@pytest.mark.parametrize("kind,targets", [("lora", finetune.ATTENTION),
                                          ("loha", finetune.ATTENTION + finetune.CONVOLUTIONS)])
def test_train_adapter_trains_the_factors_of_a_copy(untrained_tiny_sd, kind, targets):
    pipe = untrained_tiny_sd
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    scenes = finetune.concept_scenes("ring", 16, seed=2)
    unet, result = finetune.train_adapter(pipe, scenes.images, scenes.captions, kind=kind,
                                          rank=2, targets=targets, steps=3, batch_size=4)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert not lora.updates(pipe.unet)                        # the caller's UNet is untouched
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, before[key])
    found = lora.updates(unet)
    assert found and all(u.kind == kind and u.rank == 2 for u in found.values())
    zero_factor = "lora_B" if kind == "lora" else "hada_w2_b"
    assert any(getattr(u, zero_factor).abs().max() > 0 for u in found.values())   # it moved
    with pytest.raises(ValueError, match="16 images but 15 captions"):
        finetune.train_adapter(pipe, scenes.images, scenes.captions[:15], rank=2, steps=1)


def test_a_caption_longer_than_the_tokenizer_is_refused(untrained_tiny_sd):
    from diffkit.latent import tiny_sd

    pipe = untrained_tiny_sd
    limit = pipe.tokenizer.model_max_length
    long = " and ".join(["a small orange triangle at the bottom"] * 4)
    assert len(pipe.tokenizer(long).input_ids) > limit
    with pytest.raises(ValueError, match=f"fit the tokenizer's {limit} tokens"):
        tiny_sd.text_states(pipe.text_encoder, pipe.tokenizer, ["a red circle", long])
    states = tiny_sd.text_states(pipe.text_encoder, pipe.tokenizer, ["a red circle", ""])
    assert states.shape[:2] == (2, limit)
