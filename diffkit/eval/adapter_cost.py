"""What an adapter costs in time on the tiny SD's UNet (``python -m diffkit.bench lora``).

For LoRA (attention), LoCon and LoHa (attention + convolutions) of one rank: one training step
(forward, backward and AdamW on the factors) as a ratio to LoRA's and to a full fine-tuning step
of the whole UNet; one UNet call with the update attached (recomputed at every call) and merged,
as ratios to the base UNet's call. All from one process, on the same inputs.
"""

from __future__ import annotations

import copy

import torch

from diffkit.adapters import finetune, lora

KINDS = {"lora": ("lora", finetune.ATTENTION),
         "locon": ("lora", finetune.ATTENTION + finetune.CONVOLUTIONS),
         "loha": ("loha", finetune.ATTENTION + finetune.CONVOLUTIONS)}


def _inputs(pipe, batch: int, device):
    from diffkit.eval.sd_probes import prompt_scenes
    from diffkit.latent import sd

    c, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(batch, c, size, size, generator=g, device=device)
    text = sd.encode_prompt(pipe, prompt_scenes(batch, 1).captions)
    t = torch.full((batch,), 500, device=device)
    return latents, t, text, torch.randn(latents.shape, generator=g, device=device)


def adapter_cost(device, *, batch: int, repeats: int, timer, rank: int = 4) -> dict:
    from diffkit.latent import sd

    pipe = sd.load_pipeline(device=device)
    latents, t, text, noise = _inputs(pipe, batch, device)

    def call(model):
        with torch.no_grad():
            model(latents, t, encoder_hidden_states=text)

    def trainer(model):
        params = [p for p in model.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(params, lr=1e-4)

        def step():
            optimiser.zero_grad()
            out = model(latents, t, encoder_hidden_states=text).sample
            (out - noise).pow(2).mean().backward()
            optimiser.step()
        step()          # warm-up: the first step allocates the optimiser's state
        return timer(step, repeats)

    def calls(models: dict) -> dict:
        """Best time of one call of each model, timed in turns (so drift hits all alike)."""
        best = dict.fromkeys(models, float("inf"))
        for _ in range(repeats):
            for key, model in models.items():
                best[key] = min(best[key], timer(lambda: call(model), 1))
        return best

    for _ in range(3):      # warm-up: the first calls allocate and start the thread pool
        call(pipe.unet)
    full_step = trainer(copy.deepcopy(pipe.unet).requires_grad_(True))
    figures, steps = {"settings": {"batch": batch, "rank": rank}}, {}
    for name, (kind, targets) in KINDS.items():
        unet, merged = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.unet)
        for model in (unet, merged):
            lora.attach(model, finetune.present_targets(model, targets), kind=kind, rank=rank)
        steps[name] = trainer(unet)
        lora.merge(merged)
        best = calls({"base": pipe.unet, "unmerged": unet, "merged": merged})
        figures[name] = {"unmerged_over_base": best["unmerged"] / best["base"],
                         "merged_over_base": best["merged"] / best["base"],
                         "full_finetune_step_over_this": full_step / steps[name]}
    for name in KINDS:
        figures[name]["train_step_over_lora"] = steps[name] / steps["lora"]
    return figures
