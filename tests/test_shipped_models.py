"""Every shipped model re-measured live, at a small N, with the code that wrote its card.

Each test runs the recipe's own measure function (``recipes.RECIPES[NAME].measure``, which
samples with diffkit.diffusion and scores with diffkit.eval) on the shipped weights with a
smaller n, so a regression in a sampler, the denoiser wrapper, a schedule or a metric shows
here, not only in a card that was written before it. A card check alone cannot see one.

The bars come from the spread of the same measurement at the same n over 6 seeds (mean and
standard deviation next to each bar), each with a margin of more than twice that spread, and
each is one that a broken model or sampler fails: the ``*_fails_the_bars`` tests feed pure
noise or untrained networks through the same measurement. To reproduce a spread:

    OMP_NUM_THREADS=1 python -c "from diffkit import checkpoints, recipes; \
        m, _ = checkpoints.load_model(NAME); \
        print([recipes.RECIPES[NAME].measure(m, 'cpu', seed=s, **KW) for s in SEEDS])"

with NAME, KW and SEEDS as given at each test. The seed of each test is the card's.
"""

import pytest
import torch

from diffkit import checkpoints, data, recipes
from diffkit.data.shapes import make_shapes
from diffkit.eval import blip_probes, digits, distributions, metrics
from diffkit.nn.classifiers import DigitsJudge, NoisyDigitsClassifier
from diffkit.recipes import guidance as rg
from diffkit.text import blip, clip


def measure(shipped_model, name, **kw):
    model, _ = shipped_model(name)
    return recipes.RECIPES[name].measure(model, "cpu", **kw)


# --- toy2d-ddpm: 1000 ancestral steps on the MLP, sliced W2 to the 8-Gaussian ring ------------

TOY2D_N = 200
# ratio = sliced W2 (samples, truth) / sliced W2 (truth, truth), KW = dict(n=200), SEEDS 1..6:
# mean 0.870, sd 0.093 (0.764 to 0.976). Bar 1.3, 4.6 sd above the mean. The sampler's own
# starting noise N(0, I) scores 1.8 to 2.1 (below).
TOY2D_RATIO_BAR = 1.3


def test_toy2d_ddpm_live(shipped_model):
    measured = measure(shipped_model, "toy2d-ddpm", n=TOY2D_N)
    assert measured["n"] == TOY2D_N
    assert measured["ratio"] <= TOY2D_RATIO_BAR, measured


def test_toy2d_bar_fails_for_noise():
    for seed in (0, 1):       # what a sampler that returned its starting noise would give
        noise = torch.randn(TOY2D_N, 2, generator=torch.Generator().manual_seed(seed))
        measured = distributions.distance_to_exact(
            noise, lambda n, g: data.toy2d("ring8", n, generator=g),
            generator=torch.Generator().manual_seed(1), repeats=5, n_projections=512)
        assert measured["ratio"] > TOY2D_RATIO_BAR + 0.4, measured


# --- digits-judge: accuracy on the whole test split ------------------------------------------

def test_digits_judge_live(shipped_model):
    # deterministic (no seed, all 360 test digits): 1.0 on the card and here. Bar 0.97 (the
    # card's); an untrained judge scores about 0.1 (below), a swapped split or label order too
    assert measure(shipped_model, "digits-judge")["test_accuracy"] >= 0.97


def test_digits_judge_bar_fails_untrained():
    torch.manual_seed(0)
    untrained = recipes.RECIPES["digits-judge"].measure(DigitsJudge().eval(), "cpu")
    assert untrained["test_accuracy"] < 0.3


# --- digits-ddpm, digits-ddpm-cosine: 1000 ancestral steps on the UNet, judged ----------------

DIGITS_N = 100
# KW = dict(n=100), SEEDS 1..6 (digits-ddpm) and 1..5 (digits-ddpm-cosine); frechet_floor and
# diversity_real at n=100 are deterministic: 49.56 and 41.16 (100 real train digits).
#                    confident_fraction   frechet                    diversity
# digits-ddpm        0.983, sd 0.008      62.0, sd 11.6 (48.6-82.6)  40.07, sd 0.47
# digits-ddpm-cosine 0.988, sd 0.013      53.6, sd 4.5 (48.7-60.9)   40.53, sd 0.53
# classes_present: 10 in every seed of both.
# Bars: confident_fraction >= 0.9 (the card's; 6.8 sd below the lower mean), all 10 classes,
# frechet < 2 x floor = 99.1 (3.2 sd above digits-ddpm's mean: the Frechet distance of 100
# samples is that noisy), diversity >= 0.9 x diversity_real = 37.0 (6.5 sd: no mode collapse).
# Pure noise (below): Frechet 565 to 585, diversity 23 to 27, and the judge still confident on
# 70% of it, so the Frechet and diversity bars are the ones that catch a broken sampler.
DIGITS_CONFIDENT_BAR = 0.9
DIGITS_FRECHET_FACTOR = 2.0
DIGITS_DIVERSITY_FACTOR = 0.9


@pytest.mark.parametrize("name", ["digits-ddpm", "digits-ddpm-cosine"])
def test_digits_ddpm_live(shipped_model, name):
    measured = measure(shipped_model, name, n=DIGITS_N)
    assert measured["n"] == DIGITS_N
    assert measured["confident_fraction"] >= DIGITS_CONFIDENT_BAR, measured
    assert measured["classes_present"] == 10, measured
    assert measured["frechet"] < DIGITS_FRECHET_FACTOR * measured["frechet_floor"], measured
    assert measured["diversity"] >= DIGITS_DIVERSITY_FACTOR * measured["diversity_real"], measured


@pytest.fixture(scope="module")
def noise_digits():
    g = torch.Generator().manual_seed(0)
    return {"uniform": torch.rand(DIGITS_N, 1, 8, 8, generator=g) * 2 - 1,
            "gaussian": torch.randn(DIGITS_N, 1, 8, 8, generator=g).clamp(-1, 1)}


def test_digits_bars_fail_for_noise(shipped_model, noise_digits):
    judge, _ = shipped_model("digits-judge")
    labels = digits.balanced_labels(DIGITS_N)
    for samples in noise_digits.values():
        report = metrics.judge_report(judge, samples)
        assert report["frechet"] > 4 * DIGITS_FRECHET_FACTOR * report["frechet_floor"], report
        assert report["diversity"] < 0.7 * report["diversity_real"], report
        assert report["confident_fraction"] < DIGITS_CONFIDENT_BAR, report
        requested = digits.judge_requested(judge, samples, labels)
        assert requested["requested"] < 0.3               # chance: 0.1
        assert requested["frechet"] > COND_FRECHET_FACTOR * requested["frechet_floor"]


# --- digits-cond-ddpm: classifier-free guidance, 20 DPM-Solver++(2M) steps, judged -------------

COND_N = 100
# KW = dict(n=100) (scales 1 and 3), SEEDS 1..6; frechet_floor 49.56 as above:
#   w1_requested mean 0.987, sd 0.008 (0.98 to 1.0)   bar 0.93   (7 sd)
#   w3_requested 1.0 in every seed                    bar 0.95
#   w1_frechet   mean 40.6, sd 2.9 (36.5 to 44.2)      bar 1.1 x floor = 54.5   (4.8 sd)
#   w3_frechet - w1_frechet          mean 12.9, sd 2.7: > 0 (4.8 sd): guidance costs fidelity
#   w1 - w3 diversity_within          mean 2.01, sd 0.55: > 0 (3.7 sd): and diversity per class
# Pure noise: requested 0.10 to 0.13 and Frechet > 500; the 10-step model of
# test_recipes_guidance.py, about 0.1 requested.
COND_REQUESTED_BAR = 0.93
COND_FRECHET_FACTOR = 1.1


def test_digits_cond_ddpm_live(shipped_model):
    measured = measure(shipped_model, "digits-cond-ddpm", n=COND_N)
    assert measured["n"] == COND_N
    assert measured["w1_requested"] >= COND_REQUESTED_BAR, measured
    assert measured["w3_requested"] >= 0.95, measured
    assert measured["w1_frechet"] < COND_FRECHET_FACTOR * measured["frechet_floor"], measured
    assert measured["w3_frechet"] > measured["w1_frechet"], measured
    assert measured["w3_diversity_within"] < measured["w1_diversity_within"], measured


# --- digits-classifier-noisy: accuracy on q_sample'd test digits at t in T_GRID ----------------

# KW = dict(repeats=1) (one noise draw per t instead of the card's 4), SEEDS 1..6:
#   t=0   0.992 in every seed      bar >= 0.95
#   t=250 mean 0.817, sd 0.014     bar >= 0.75  (4.7 sd)
#   t=500 mean 0.300, sd 0.016     bar <= 0.40  (6 sd): the measurement does noise the digits
#   t=750 mean 0.135, sd 0.015     bar <= 0.20  (4.3 sd)
#   t=999 mean 0.102, sd 0.013     bar <= 0.20  (7.5 sd): pure noise, chance is 0.1
#   t=500 - t=750 mean 0.165, sd 0.016: > 0.1 (4 sd)
# An untrained classifier scores 0.15 at t=0 (below); one that never sees noise would score
# 0.99 at every t and fail the upper bars.
NOISY_BARS = {0: (0.95, 1.0), 250: (0.75, 1.0), 500: (0.0, 0.40), 750: (0.0, 0.20),
              999: (0.0, 0.20)}


def test_noisy_classifier_live(shipped_model):
    measured = measure(shipped_model, "digits-classifier-noisy", repeats=1)
    assert set(NOISY_BARS) == set(rg.T_GRID)
    for t, (low, high) in NOISY_BARS.items():
        assert low <= measured[f"accuracy_t{t}"] <= high, (t, measured)
    assert measured["accuracy_t500"] - measured["accuracy_t750"] > 0.1, measured


def test_noisy_classifier_bars_fail_untrained():
    torch.manual_seed(0)
    untrained = NoisyDigitsClassifier(**rg.NOISY_CLASSIFIER).eval()
    measured = recipes.RECIPES["digits-classifier-noisy"].measure(untrained, "cpu", repeats=1)
    assert measured["accuracy_t0"] < NOISY_BARS[0][0] - 0.5


# --- shapes-clip: zero-shot, retrieval and the probes on held-out scenes -----------------------

CLIP_N = 200
# KW = dict(n=200), SEEDS 2000, 2003, ..., 2015 (2000 is the card's test seed):
#   zero_shot_{colour,shape,size,position}  1.0 in every seed    bar >= 0.95
#   image_to_text_R@1  mean 0.993, sd 0.007    bar >= 0.95 (6 sd)
#   text_to_image_R@1  mean 0.993, sd 0.005    bar >= 0.95 (8 sd)
#   binding_rate       mean 0.900, sd 0.027    bar >= 0.80 (3.7 sd; chance 0.5)
#   count_drop_rate, count_add_rate  1.0 in every seed   bar >= 0.95
# An untrained tiny CLIP: zero-shot colour 0.16, R@1 0.005 to 0.03, binding 0.54 (below).
CLIP_BARS = {"zero_shot_colour": 0.95, "zero_shot_shape": 0.95, "zero_shot_size": 0.95,
             "zero_shot_position": 0.95, "image_to_text_R@1": 0.95, "text_to_image_R@1": 0.95,
             "binding_rate": 0.8, "count_drop_rate": 0.95, "count_add_rate": 0.95}


def test_shapes_clip_live(shipped_model):
    model, card = shipped_model("shapes-clip")
    measured = measure(shipped_model, "shapes-clip", n=CLIP_N)
    failed = {k: measured[k] for k, bar in CLIP_BARS.items() if measured[k] < bar}
    assert not failed, failed
    assert measured["inverse_temperature"] == card["measured"]["inverse_temperature"]


def test_clip_bars_fail_untrained():
    torch.manual_seed(0)
    tiny = clip.TinyCLIP(text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2),
                         vision=dict(channels=[16, 16, 16, 16], width=32), embed_dim=16).eval()
    measured = recipes.RECIPES["shapes-clip"].measure(tiny, "cpu", n=CLIP_N)
    passed = [k for k, bar in CLIP_BARS.items() if measured[k] >= bar]
    assert passed == [], {k: measured[k] for k in passed}


# --- shapes-blip: captions, ITM and retrieval of BLIP and BLIP-2 on held-out scenes ------------

BLIP_N = 100
# KW = dict(n_caption=100, n_retrieval=100), SEEDS 6101, 6103, ..., 6111 (6101 is the card's):
#   blip_caption_colour_shape, blip2_caption_colour_shape  1.0 in every seed   bar >= 0.9
#   lm_alone_caption_colour_shape  mean 0.042, sd 0.029   bar <= 0.2 (5.5 sd): the frozen LM
#                                  alone cannot caption, so the captions come from the image
#   blip_itm_positive_accuracy     1.0 in every seed       bar >= 0.9
#   blip_r1_itc_cosine             mean 0.977, sd 0.010    bar >= 0.9 (7.5 sd)
#   blip2_stage1_r1_itc            mean 0.972, sd 0.010    bar >= 0.9 (7 sd)
# An untrained BLIP captions colour and shape right 0 to 12% of the time (below).
BLIP_BARS = {"blip_caption_colour_shape": 0.9, "blip2_caption_colour_shape": 0.9,
             "blip_itm_positive_accuracy": 0.9, "blip_r1_itc_cosine": 0.9,
             "blip2_stage1_r1_itc": 0.9}


def test_shapes_blip_live(shipped_model):
    measured = measure(shipped_model, "shapes-blip", n_caption=BLIP_N, n_retrieval=BLIP_N)
    failed = {k: measured[k] for k, bar in BLIP_BARS.items() if measured[k] < bar}
    assert not failed, failed
    assert measured["lm_alone_caption_colour_shape"] <= 0.2, measured


def test_blip_caption_bar_fails_untrained():
    torch.manual_seed(0)
    untrained = blip.BLIP(dim=32, depth=1, heads=2, embed_dim=16).eval()
    single = make_shapes(40, seed=recipes.blip.TEST_SEED, objects=1)
    accuracy = blip_probes.caption_accuracy(untrained.caption(single.images), single.objects)
    assert accuracy["colour_shape"] < BLIP_BARS["blip_caption_colour_shape"] - 0.5, accuracy


# --- shapes-vae: the shapes judge on round trips of held-out scenes --------------------------

SHAPES_VAE_N = 100
# KW = dict(n=100), SEEDS vae_probes.SHAPES_TEST_SEED + 0, 10, ..., 50 (+ 0 is the card's):
#   shape_1obj  mean 0.998, sd 0.004   bar >= 0.97 (7 sd)
#   colour_1obj, position_1obj, count_1obj, size_1obj  1.0 in every seed   bar >= 0.97
#   psnr_1obj   mean 37.6 dB, sd 0.40  bar >= 33 dB (11 sd)
#   shape_2obj  mean 0.997, sd 0.005   bar >= 0.95 (9 sd)
# An untrained VAE of the same configuration fails every bar (below).
SHAPES_VAE_BARS = {"shape_1obj": 0.97, "colour_1obj": 0.97, "position_1obj": 0.97,
                   "count_1obj": 0.97, "size_1obj": 0.97, "psnr_1obj": 33.0, "shape_2obj": 0.95}


def test_shapes_vae_live(shipped_model):
    model, card = shipped_model("shapes-vae")
    measured = measure(shipped_model, "shapes-vae", n=SHAPES_VAE_N)
    failed = {k: measured[k] for k, bar in SHAPES_VAE_BARS.items() if measured[k] < bar}
    assert not failed, failed
    assert measured["scaling_factor"] == card["measured"]["scaling_factor"]


def test_shapes_vae_bars_fail_untrained():
    from diffkit.latent.vae import make_vae

    torch.manual_seed(0)
    measured = recipes.RECIPES["shapes-vae"].measure(make_vae().eval(), "cpu", n=SHAPES_VAE_N)
    passed = [k for k, bar in SHAPES_VAE_BARS.items() if measured[k] >= bar]
    assert passed == [], {k: measured[k] for k in passed}


# --- shapes-vae-ft: the decoder taught orange and rings, the encoder unchanged ---------------

# KW = dict(n=100), SEEDS vae_probes.SHAPES_TEST_SEED + 0, 10, ..., 50:
#   shapes-vae-ft  orange_colour 1.0 in every seed; orange_shape mean 0.988, sd 0.007;
#                  ring_shape_small and ring_shape_large 1.0 in every seed; the base bars as
#                  shapes-vae's (shape_2obj mean 0.983, sd 0.008: 4 sd above 0.95)
#   shapes-vae     orange_colour mean 0.45, sd 0.03; ring_shape_small mean 0.06, sd 0.05
#                  (large rings 0.99): the shipped decoder cannot draw the concepts
SHAPES_VAE_FT_BARS = {"concept_orange_colour": 0.97, "concept_orange_shape": 0.95,
                      "concept_ring_shape_small": 0.97, "concept_ring_shape_large": 0.97}


def test_shapes_vae_ft_live(shipped_model):
    measured = measure(shipped_model, "shapes-vae-ft", n=SHAPES_VAE_N)
    bars = {**SHAPES_VAE_BARS, **SHAPES_VAE_FT_BARS}
    failed = {k: measured[k] for k, bar in bars.items() if measured[k] < bar}
    assert not failed, failed
    assert measured["encoder_max_change"] == 0.0       # every latent is shapes-vae's
    _, card = shipped_model("shapes-vae")
    assert measured["scaling_factor"] == card["measured"]["scaling_factor"]


def test_shapes_vae_ft_bars_fail_for_the_shipped_decoder(shipped_model):
    from diffkit.eval import vae_probes

    base, _ = shipped_model("shapes-vae")
    measured = vae_probes.concept_report(base, "cpu", n=SHAPES_VAE_N)
    assert measured["orange_colour"] < 0.6 and measured["ring_shape_small"] < 0.3, measured


# --- patches-vae: the family of chapter 8's sweeps on held-out natural patches ----------------

PATCHES_VAE_N = 100
# KW = dict(n=100), SEEDS vae_probes.PATCHES_TEST_SEED + 0, 10, ..., 50 (+ 0 is the card's):
#   base PSNR          mean 25.75 dB, sd 0.25   bar >= 24.5 dB (5 sd)
#   factor-2 PSNR      mean 28.38 dB, sd 0.27   bar >= base + 1.5 (the gap is 2.6, 8 sd of one)
#   rate (KL / entry)  kl-1 0.32, kl-1e-2 2.84, base 4.90, kl-1e-4 5.14, each sd < 0.08:
#                      the order kl-1 < kl-1e-2 < base and kl-1e-4 holds by > 25 sd
#   latents to N(0, I) (Frechet, biased up at n = 100) kl-1 mean 261 (sd 2), base 822 (sd 19):
#                      bar kl-1 < 0.5 x base
# An untrained family fails the PSNR bar (below).


def _patches_bars_failed(measured) -> list[str]:
    rate = {m: measured[m]["kl_per_latent_entry"] for m in ("base", "kl-1e-4", "kl-1e-2", "kl-1")}
    checks = {
        "base psnr": measured["base"]["psnr"] >= 24.5,
        "factor-2 psnr": measured["factor-2"]["psnr"] >= measured["base"]["psnr"] + 1.5,
        "rate order": rate["kl-1"] < rate["kl-1e-2"] < min(rate["base"], rate["kl-1e-4"]),
        "prior distance": measured["kl-1"]["latent_prior_frechet"]
        < 0.5 * measured["base"]["latent_prior_frechet"],
    }
    return [name for name, ok in checks.items() if not ok]


def test_patches_vae_live(shipped_model):
    measured = measure(shipped_model, "patches-vae", n=PATCHES_VAE_N)
    assert _patches_bars_failed(measured) == [], measured


def test_patches_vae_bars_fail_untrained():
    from diffkit.latent.vae import make_vae

    torch.manual_seed(0)
    members = {name: make_vae(**{k: v for k, v in spec.items() if k != "kl_weight"}).eval()
               for name, spec in recipes.latent.PATCHES_MEMBERS.items()}
    untrained = torch.nn.ModuleDict(members)
    measured = recipes.RECIPES["patches-vae"].measure(untrained, "cpu", n=PATCHES_VAE_N)
    assert "base psnr" in _patches_bars_failed(measured), measured["base"]


# --- shapes-sd: the shapes judge on what the tiny SD draws for held-out prompts ---------------

SHAPES_SD_N = 100
# KW = dict(n=100), SEEDS sd_probes.SD_TEST_SEED + 0, 10, 20, 30 (+ 0 is the card's), 2 threads:
#   colour_1obj 1.0 in every seed; size_1obj 0.99-1.0; position_1obj 1.0; count_1obj 0.99-1.0
#                                                           bars >= 0.95 (4+ misses in 100)
#   shape_1obj  0.88, 0.90, 0.83, 0.85: mean 0.865, sd 0.03  bar >= 0.70 (5 sd below)
#   count_2obj  0.96, 0.98, 0.95, 0.90: mean 0.95, sd 0.03   bar >= 0.80 (5 sd below)
# (issue 11's bar, colour and shape both right >= 0.90, is not met: see the card.)
# The same pipeline with an untrained UNet fails every bar (below).
SHAPES_SD_BARS = {"colour_1obj": 0.95, "size_1obj": 0.95, "position_1obj": 0.95,
                  "count_1obj": 0.95, "shape_1obj": 0.70, "count_2obj": 0.80}


def test_shapes_sd_live(shipped_model):
    measured = measure(shipped_model, "shapes-sd", n=SHAPES_SD_N)
    failed = {k: measured[k] for k, bar in SHAPES_SD_BARS.items() if measured[k] < bar}
    assert not failed, failed


def test_shapes_sd_bars_fail_untrained(shipped_model):
    from diffkit.latent import tiny_sd

    pipe, _ = shipped_model("shapes-sd")
    torch.manual_seed(0)
    unet = tiny_sd.make_unet(pipe.text_encoder.config.hidden_size,
                             **recipes.sd.SD_UNET).eval()
    untrained = tiny_sd.build_pipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, unet,
                                       pipe.scheduler)
    untrained.set_progress_bar_config(disable=True)
    measured = recipes.RECIPES["shapes-sd"].measure(untrained, "cpu", n=SHAPES_SD_N)
    passed = [k for k, bar in SHAPES_SD_BARS.items() if measured[k] >= bar]
    assert passed == [], {k: measured[k] for k in passed}


# --- shapes-controlnet, shapes-t2i-adapter: mask IoU on held-out layouts -----------------------

CONTROL_N = 50
# KW = dict(n=50, scales=(1.0,)), SEEDS control_probes.CONTROL_TEST_SEED + 0, 10, 20, 30, 2 threads:
#   IoU gain over prompt-only at scale 1: ControlNet 0.706, 0.603, 0.688, 0.645: mean 0.66, sd 0.05
#                                          T2I-Adapter 0.606, 0.516, 0.620, 0.574: mean 0.58, sd 0.05
#   bar >= 0.4 (ControlNet 5 sd, adapter 3.6 sd below the mean; the bar is 0.2 at N = 200)
#   colour at scale 1: 1.0 in every seed for both                 bar >= 0.9
# Untrained, the ControlNet gains exactly 0 (zero residuals) and the adapter 0.015 (below).
CONTROL_IOU_GAIN, CONTROL_COLOUR = 0.4, 0.9


def _control_bars_failed(measured) -> list[str]:
    prompt, control = measured["by_setting"]["prompt"], measured["by_setting"]["scale=1"]
    checks = {"iou gain": control["iou"] >= prompt["iou"] + CONTROL_IOU_GAIN,
              "colour": control["colour"] >= CONTROL_COLOUR}
    return [name for name, ok in checks.items() if not ok]


@pytest.mark.parametrize("name", ["shapes-controlnet", "shapes-t2i-adapter"])
def test_control_models_live(shipped_model, name):
    measured = measure(shipped_model, name, n=CONTROL_N, scales=(1.0,))
    assert _control_bars_failed(measured) == [], measured["by_setting"]


def test_control_bars_fail_untrained(shipped_model):
    from diffkit.latent import controlnet

    pipe, _ = shipped_model("shapes-sd")
    torch.manual_seed(0)
    for make, name in ((controlnet.make_controlnet, "shapes-controlnet"),
                       (controlnet.make_t2i_adapter, "shapes-t2i-adapter")):
        untrained = make(pipe.unet, pipe.vae).eval()
        measured = recipes.RECIPES[name].measure(untrained, "cpu", n=CONTROL_N, scales=(1.0,))
        assert "iou gain" in _control_bars_failed(measured), measured["by_setting"]


# --- shapes-lora-orange, shapes-lora-ring: the concept drawn, the base prompts kept -----------

# lora_probes.report, DPM++(2M) 20 steps, w = 3, SEEDS CONCEPT_TEST_SEED + 0, 10, ..., 50, n = 100:
#   orange  concept_adapted mean 0.995, sd 0.008; concept_base 0.19, sd 0.045;
#           damage (base prompts' colour-and-shape, base - adapted) mean -0.002, sd 0.027
#   ring    concept_adapted mean 0.965, sd 0.017; concept_base 0.012, sd 0.009;
#           damage mean 0.16, sd 0.044 (squares drawn hollow: the 5-point bar is not met)
# The damage bar is tested at n = 200 (sd about 0.019, so 0.05 is more than 2 sd above 0).
LORA_N, LORA_DAMAGE_N = 100, 200
LORA_CONCEPT_BAR, LORA_DAMAGE_BAR = 0.80, 0.05
RING_DAMAGE_GUARD = 0.30        # a regression guard (mean + 3 sd), not the bar


def _lora_report(shipped_model, concept, n):
    from diffkit.adapters import finetune
    from diffkit.eval import lora_probes

    adapter, card = shipped_model(f"shapes-lora-{concept}")
    pipe = finetune.concept_pipeline("cpu")
    rec = card["measured"]
    return lora_probes.report(pipe, adapter.unet, concept, n=n,
                              steps=rec["num_inference_steps"],
                              guidance_scale=rec["guidance_scale"], sampler=rec["scheduler"])


def test_shapes_lora_orange_live(shipped_model):
    measured = _lora_report(shipped_model, "orange", LORA_DAMAGE_N)
    assert measured["concept_adapted"] >= LORA_CONCEPT_BAR, measured
    assert measured["concept_base"] < 0.5, measured        # the base cannot draw orange
    assert measured["damage"] <= LORA_DAMAGE_BAR, measured


def test_shapes_lora_ring_live(shipped_model):
    measured = _lora_report(shipped_model, "ring", LORA_N)
    assert measured["concept_adapted"] >= LORA_CONCEPT_BAR, measured
    assert measured["concept_base"] < 0.2, measured        # nor a ring
    assert measured["damage"] <= RING_DAMAGE_GUARD, measured


@pytest.mark.parametrize("concept", ["orange", "ring"])
def test_shipped_adapters_plug_into_diffusers_own_pipeline(shipped_card, concept):
    # the README's four lines, with diffusers' own calls only: the concept appears with the
    # adapter loaded (n = 40: the card's mean is > 5 binomial sd above the bar) and is gone,
    # image for image, once it is unloaded
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from diffkit.eval import lora_probes

    shipped_card(f"shapes-lora-{concept}")
    root = checkpoints.ROOT
    pipe = StableDiffusionPipeline.from_pretrained(root / "shapes-sd")
    pipe.vae = AutoencoderKL.from_pretrained(root / "shapes-vae-ft")
    pipe.set_progress_bar_config(disable=True)
    prompts = lora_probes.concept_prompts(concept, 40)

    def draw():
        return pipe(prompts.captions, num_inference_steps=20, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images * 2 - 1

    base = draw()
    pipe.load_lora_weights(root / f"shapes-lora-{concept}")
    adapted = lora_probes.concept_figures(concept, prompts, draw())["concept"]
    pipe.unload_lora_weights()
    unloaded = draw()
    assert adapted >= LORA_CONCEPT_BAR > lora_probes.concept_figures(concept, prompts,
                                                                     base)["concept"]
    assert (unloaded - base).abs().max() <= 1e-6


def test_shapes_lora_sweep_live(shipped_model):
    # the sweep's widest gap, live on n = 50 held-out ring prompts: LoCon r4 draws the ring
    # (card, N = 100: 0.99), LoRA r1 on attention does not (0.07)
    from diffkit.adapters import finetune
    from diffkit.eval import lora_probes, sd_probes

    family, card = shipped_model("shapes-lora-sweep")
    pipe = finetune.concept_pipeline("cpu")
    prompts = lora_probes.concept_prompts("ring", 50)
    read = {}
    for name in ("ring-locon-r4", "ring-lora-r1"):
        with lora_probes.using_unet(pipe, family.members[name].unet):
            drawn = sd_probes.generate(pipe, prompts.captions, steps=20, guidance_scale=3.0)
        read[name] = lora_probes.concept_figures("ring", prompts, drawn)["concept"]
    assert read["ring-locon-r4"] >= LORA_CONCEPT_BAR and read["ring-lora-r1"] <= 0.3, read
    assert len(card["measured"]) == 24


def test_every_shipped_model_is_measured_live_here():
    # a new recipe needs its live re-measurement in this file (chapter 12's are in
    # test_shipped_personalize.py)
    measured_here = {"toy2d-ddpm", "digits-judge", "digits-ddpm", "digits-ddpm-cosine",
                     "digits-cond-ddpm", "digits-classifier-noisy", "shapes-clip", "shapes-blip",
                     "shapes-vae", "shapes-vae-ft", "patches-vae", "shapes-sd", "shapes-controlnet",
                     "shapes-t2i-adapter", "shapes-lora-orange", "shapes-lora-ring",
                     "shapes-lora-sweep", "shapes-dreambooth-orange", "shapes-dreambooth-ring",
                     "shapes-ti-orange", "shapes-ti-ring", "shapes-lora-fewshot"}
    assert set(recipes.RECIPES) == measured_here
