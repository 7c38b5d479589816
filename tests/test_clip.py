"""diffkit.text.clip: word-level tokenizer, InfoNCE loss, the tiny CLIP and its temperature's
cap, export, probes, shipped card."""

import functools
import math

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from diffkit import checkpoints, recipes
from diffkit.data.shapes import ShapeObject, make_shapes
from diffkit.eval import clip_probes
from diffkit.text import clip
from diffkit.train import train

TINY = dict(text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2),
            vision=dict(channels=[16, 16, 16, 16], width=32), embed_dim=16)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return clip.TinyCLIP(**TINY).eval()


def test_every_word_is_one_token_and_captions_round_trip():
    tok = clip.make_tokenizer()
    for word in clip.WORDS:
        ids = tok(word)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == [clip.BOS, word + "</w>", clip.EOS], word
    batch = make_shapes(50, seed=3)
    for text in batch.captions:
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text.split()) + 2
        assert tok.decode(ids, skip_special_tokens=True) == text
    # a word outside the vocabulary falls back to letters, never to the unknown token
    ids = tok("zebra")["input_ids"][1:-1]
    assert tok.convert_ids_to_tokens(ids) == ["z", "e", "b", "r", "a</w>"]
    assert tok.model_max_length == 20 and tok.pad_token_id == tok.eos_token_id


def test_word_level_bpe_rejects_bad_words():
    for words in ([], ["Red"], ["a b"], ["ok", ""]):
        with pytest.raises(ValueError, match="lower-case"):
            clip.word_level_bpe(words)


def test_contrastive_loss_is_symmetric_infonce_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.3, 1.0, 0.2], [-0.5, 1.5, 0.7]])

    def mean_ce(rows):  # -log softmax of the diagonal, by hand
        return sum(math.log(sum(math.exp(v) for v in row)) - row[i]
                   for i, row in enumerate(rows)) / len(rows)
    rows, cols = logits.tolist(), logits.T.tolist()
    expected = (mean_ce(rows) + mean_ce(cols)) / 2
    assert clip.contrastive_loss(logits).item() == pytest.approx(expected, abs=1e-6)
    assert clip.contrastive_loss(logits.T).item() == pytest.approx(expected, abs=1e-6)
    assert mean_ce(rows) != pytest.approx(mean_ce(cols))  # the two directions differ here
    with pytest.raises(ValueError, match="square"):
        clip.contrastive_loss(torch.zeros(2, 3))


def test_model_shapes_unit_vectors_and_temperature(tiny):
    batch = make_shapes(6, seed=4)
    image_emb, text_emb = tiny.encode_image(batch.images), tiny.encode_text(batch.captions)
    assert image_emb.shape == text_emb.shape == (6, 16)
    assert torch.allclose(image_emb.norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.allclose(text_emb.norm(dim=1), torch.ones(6), atol=1e-5)
    with torch.no_grad():
        logits = tiny(batch.images, tiny.tokenize(batch.captions))
        assert torch.allclose(logits, tiny.scale() * image_emb @ text_emb.T, atol=1e-5)
        assert tiny.zero_shot(batch.images, batch.captions).shape == (6,)
        assert tiny.scale().item() == pytest.approx(1 / 0.07)
        tiny.clamp_parameters()                       # below the cap: a no-op
        assert tiny.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    loss = clip.clip_loss(tiny, (clip.to_uint8_images(batch.images), tiny.tokenize(batch.captions)))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_temperature_is_capped_after_the_step_not_in_the_forward_pass():
    # CLIP caps exp(s) at 100 by clipping s after the optimiser step; a clamp inside forward
    # would give s no gradient above the cap, so it could never come back down by itself
    torch.manual_seed(0)
    model = clip.TinyCLIP(**TINY)
    batch = make_shapes(8, seed=4)
    data = (clip.to_uint8_images(batch.images), model.tokenize(batch.captions))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(400.0))               # above the cap of 100
    clip.clip_loss(model, data).backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs().item() > 0
    assert model.scale().item() == pytest.approx(400.0, rel=1e-5)   # forward: exp(s) as it is
    model.zero_grad()
    train(model, clip.clip_loss, data, steps=1, batch_size=8, warmup=1, progress=False)
    assert bool(model.logit_scale <= clip.MAX_LOG_SCALE)       # compared in float32
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_padding_after_eos_does_not_change_the_text_embedding(tiny):
    ids = tiny.tokenize(["a red circle"])
    short = ids[:, :5]  # BOS a red circle EOS
    with torch.no_grad():
        assert torch.allclose(tiny.text_features(ids), tiny.text_features(short), atol=1e-6)


def test_bad_input_raises(tiny):
    with pytest.raises(ValueError, match="at most 20"):
        tiny.encode_text(["a red circle and a blue square and a green triangle and a small cyan "
                          "square on the left"])
    with pytest.raises(ValueError, match="list of strings"):
        tiny.encode_text("a red circle")
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        tiny.image_features(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="paired"):
        clip.retrieval_recall(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="each k"):
        clip.retrieval_recall(torch.eye(3), torch.eye(3), ks=(5,))
    with pytest.raises(ValueError, match="one-object"):
        clip_probes.zero_shot_accuracy(tiny, make_shapes(4, seed=0, objects=2))
    with pytest.raises(ValueError, match="attribute"):
        clip_probes.attribute_prompts("texture")


def test_retrieval_recall_by_hand():
    image = torch.eye(4)
    text = torch.eye(4)[[0, 1, 3, 2]]   # texts 2 and 3 swapped
    r = clip.retrieval_recall(image, text, ks=(1, 4))
    assert r["image_to_text_R@1"] == 0.5 and r["text_to_image_R@1"] == 0.5
    assert r["image_to_text_R@4"] == 1.0 and r["text_to_image_R@4"] == 1.0
    # when pairs 2 and 3 have identical captions, either answer is right
    r = clip.retrieval_recall(image, text, ks=(1,), groups=torch.tensor([0, 1, 2, 2]))
    assert r["image_to_text_R@1"] == 1.0 and r["text_to_image_R@1"] == 1.0


def test_export_round_trip(tiny, tmp_path):
    clip.export_text_encoder(tiny, tmp_path)
    encoder = CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert (tmp_path / "text_encoder" / "model.safetensors").exists()
    prompts = ["a large red circle on the left", "a blue square and a small green triangle"]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt")["input_ids"]
    assert torch.equal(ids, tiny.tokenize(prompts))
    with torch.no_grad():
        ours, theirs = tiny.text_model(input_ids=ids), encoder(input_ids=ids)
    assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)
    assert torch.equal(ours.pooler_output, theirs.pooler_output)


def test_card_kwargs_rebuild_the_model(tiny):
    card = {"model": {"class": "TinyCLIP", "module": "diffkit.text.clip", "kwargs": tiny.config}}
    rebuilt = checkpoints.build_model(card)
    rebuilt.load_state_dict(tiny.state_dict())
    text = ["a cyan triangle at the top"]
    assert torch.equal(rebuilt.eval().encode_text(text), tiny.encode_text(text))


def test_probe_captions_swap_what_they_say():
    batch = make_shapes(2, seed=0, objects=1)
    a = ShapeObject("circle", "red", "large", "left")
    b = ShapeObject("square", "blue", "small", "right")
    batch.objects = [[a, b], [a]]
    probes = clip_probes.probe_captions(batch)
    assert probes["binding"] == ([0], ["a red circle and a blue square"],
                                 ["a blue circle and a red square"])
    assert probes["order"][2] == ["a blue square and a red circle"]
    assert probes["count_drop"][2] == ["a red circle"]
    idx, true, added = probes["count_add"]
    assert idx == [1] and true == ["a red circle"] and added[0].startswith("a red circle and a ")
    assert added[0] != "a red circle and a red circle"
    assert [len(clip_probes.attribute_prompts(k)[0]) for k in clip_probes.ATTRIBUTES] == \
        [18, 18, 36, 90]


def test_recipe_runs_and_its_card_rebuilds_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes.clip, "CLIP_POOL", 256)
    monkeypatch.setattr(recipes.clip, "clip_report",
                        functools.partial(clip_probes.clip_report, n=40))
    card = recipes.run("shapes-clip", root=tmp_path, steps=2, progress=False, device="cpu")
    assert card["model"]["module"] == "diffkit.text.clip"
    assert {"zero_shot_colour", "zero_shot_shape", "image_to_text_R@1", "text_to_image_R@5",
            "binding_rate", "order_rate", "count_add_rate"} <= card["measured"].keys()
    model, _ = checkpoints.load_model("shapes-clip", root=tmp_path)
    assert isinstance(model, clip.TinyCLIP)


def test_shipped_checkpoint_meets_the_bars(shipped_model):
    # the card's figures; tests/test_shipped_models.py re-measures them live
    model, card = shipped_model("shapes-clip")
    measured = card["measured"]
    assert measured["zero_shot_colour"] >= 0.95 and measured["zero_shot_shape"] >= 0.95
    size = (checkpoints.checkpoint_dir("shapes-clip") / "model.safetensors").stat().st_size
    assert size < 16 * 2**20
    # the card's temperature is the weights' (below the cap: training never hit the clamp)
    assert measured["inverse_temperature"] == pytest.approx(model.scale().item(), abs=1e-4)
    assert model.logit_scale.item() < clip.MAX_LOG_SCALE
