"""Recipes of chapter 13: ``shapes-controlnet`` and ``shapes-t2i-adapter``, two control models
for the frozen ``shapes-sd``, trained on the same scenes with the objects' masks as condition.

The scenes put their objects anywhere in the frame, so the layout is in the condition and not
in the caption. The VAE, text encoder and UNet of ``shapes-sd`` are frozen and the latents and
text states computed once; only the control model trains, on SD's loss with half of the
captions dropped (the ControlNet paper's 50%, so the condition is read on its own as well).
At fixed steps the live model's adherence (mask IoU of a few held-out layouts,
:mod:`diffkit.eval.control_probes`) is recorded, for the "sudden convergence" curve. The
checkpoint is the diffusers model folder (``ControlNetModel`` / ``T2IAdapter``
``from_pretrained``) with its card.
"""

from __future__ import annotations

import torch

from diffkit import checkpoints
from diffkit.data.shapes import make_shapes
from diffkit.eval import control_probes
from diffkit.latent import controlnet as C
from diffkit.latent import tiny_sd
from diffkit.recipes.registry import SEED, recipe
from diffkit.recipes.sd import RECOMMENDED
from diffkit.train import TrainResult, train

CONTROL_TRAIN_SEED = 913
CONDITION = "masks"
CONTROL_HYPER = dict(pool=20_000, batch_size=128, ema_decay=0.999, warmup=100,
                     caption_dropout=0.5)
LR = {"controlnet": 5e-4, "t2i-adapter": 1e-3}
# the adherence trace: the live model on TRACE_N held-out layouts every TRACE_FINE steps up to
# TRACE_FINE_UNTIL (where the jump happens), then every TRACE_EVERY steps
TRACE_FINE, TRACE_FINE_UNTIL, TRACE_EVERY, TRACE_N, TRACE_STEPS = 10, 200, 100, 64, 10
MEASURE_SCALES = (0.5, 1.0, 1.5)
# the sampler settings everything here is measured at: shapes-sd's recommended ones
SAMPLING = dict(steps=RECOMMENDED["num_inference_steps"],
                guidance_scale=RECOMMENDED["guidance_scale"], sampler=RECOMMENDED["scheduler"])


def base_pipeline(device):
    """The frozen ``shapes-sd`` pipeline every control model is trained and measured on."""
    pipe, _ = checkpoints.load_model("shapes-sd", device=device)
    for part in (pipe.vae, pipe.text_encoder, pipe.unet):
        part.requires_grad_(False)
    return pipe


def control_quality(control, device, *, n: int = 200, seed: int = control_probes.CONTROL_TEST_SEED,
                    scales=MEASURE_SCALES) -> dict:
    """Adherence and prompt accuracy at the recommended sampler settings, N held-out one-object
    layouts, prompt-only and at each conditioning scale of ``scales``."""
    pipe = base_pipeline(device)
    control = control.to(device)
    scenes = control_probes.control_scenes(n, seed=seed)
    figures = control_probes.adherence(
        pipe, control, scenes, scales, kind=CONDITION, seed=seed, **SAMPLING)
    return {"n": n, "seed": seed, "condition": CONDITION, **RECOMMENDED,
            "by_setting": {k: {m: round(v, 4) for m, v in f.items()} for k, f in figures.items()}}


def _trace(pipe, model, trace: list, scenes, condition):
    """A ``train`` callback: the live model's mean mask IoU at the trace's steps."""
    def callback(step, loss):
        if step % (TRACE_FINE if step <= TRACE_FINE_UNTIL else TRACE_EVERY):
            return
        model.eval()
        images = control_probes.generate(
            pipe, scenes.captions, control=model, condition=condition,
            seed=control_probes.CONTROL_TEST_SEED, **{**SAMPLING, "steps": TRACE_STEPS})
        model.train()
        trace.append([step, round(float(control_probes.mask_iou(images, scenes.masks).mean()),
                                  4)])
    return callback


def _train_control(kind: str, make, steps, device, state_path, progress):
    pipe = base_pipeline(device)
    scenes = make_shapes(CONTROL_HYPER["pool"], seed=CONTROL_TRAIN_SEED, anywhere=True)
    latents, states = tiny_sd.encode_pool(pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                          scenes.images, scenes.captions,
                                          generator=torch.Generator().manual_seed(SEED))
    control_images = C.conditions(scenes, CONDITION)
    empty = tiny_sd.text_states(pipe.text_encoder, pipe.tokenizer, [""])
    torch.manual_seed(SEED)
    model = make(pipe.unet, pipe.vae)
    loss = C.ControlNetLoss(pipe.unet, pipe.scheduler.alphas_cumprod, empty,
                            caption_dropout=CONTROL_HYPER["caption_dropout"])
    held_out = control_probes.control_scenes(TRACE_N, seed=control_probes.CONTROL_TEST_SEED + 1)
    trace: list = []
    callback = _trace(pipe, model, trace, held_out, C.conditions(held_out, CONDITION))
    keys = ("batch_size", "ema_decay", "warmup")
    result = train(model, loss, (latents.cpu(), states.cpu(), control_images), steps=steps,
                   seed=SEED, device=device, state_path=state_path, progress=progress,
                   lr=LR[kind], callback=callback, **{k: CONTROL_HYPER[k] for k in keys})
    parameters = sum(p.numel() for p in result.ema.parameters())
    return (TrainResult(result.ema, result.ema, result.losses, result.steps, result.wall_time,
                        result.resumed_from),
            {**CONTROL_HYPER, "lr": LR[kind], "condition": CONDITION,
             "train_seed": CONTROL_TRAIN_SEED, "parameters": parameters,
             "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
             "trace": {"every": TRACE_EVERY, "fine": TRACE_FINE,
                       "fine_until": TRACE_FINE_UNTIL, "n": TRACE_N, "sampling_steps": TRACE_STEPS,
                       "model": "live (not EMA)", "step_iou": trace}})


@recipe("shapes-controlnet", "ControlNet (from_unet copy, zero convolutions) on the frozen "
        "shapes-sd, conditioned on object masks (chapter 13)", 4000, control_quality)
def shapes_controlnet(steps, device, state_path, progress):
    return _train_control("controlnet", C.make_controlnet, steps, device, state_path, progress)


@recipe("shapes-t2i-adapter", "T2I-Adapter (full adapter, features added to the encoder) on "
        "the frozen shapes-sd, conditioned on object masks (chapter 13)", 4000, control_quality)
def shapes_t2i_adapter(steps, device, state_path, progress):
    return _train_control("t2i-adapter", C.make_t2i_adapter, steps, device, state_path,
                          progress)
