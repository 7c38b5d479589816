"""diffkit.latent.controlnet: from_unet's copy and zero convolutions, the identity at
initialisation, the first steps' gradients, and the sampling loop against diffusers' pipeline."""

import copy

import pytest
import torch

from diffkit.latent import controlnet as C
from diffkit.latent import sd, tiny_sd

PROMPTS = ["a large red circle on the left", "a small blue square at the top"]


@pytest.fixture(scope="module")
def parts(untrained_tiny_sd):
    shared = untrained_tiny_sd                # its modules; a pipeline of our own (schedulers)
    pipe = tiny_sd.build_pipeline(shared.vae, shared.text_encoder, shared.tokenizer, shared.unet)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    return pipe, C.make_controlnet(pipe.unet, pipe.vae)


def condition(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomised(controlnet, seed=1):
    live = copy.deepcopy(controlnet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in C.zero_modules(controlnet):
            for p in live.get_submodule(name).parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return live


def test_from_unet_copies_the_encoder_and_zeroes_every_output(parts):
    pipe, net = parts
    zeros = C.zero_modules(net)
    assert "controlnet_mid_block" in zeros and "controlnet_cond_embedding.conv_out" in zeros
    assert sum(z.startswith("controlnet_down_blocks.") for z in zeros) == len(
        net.controlnet_down_blocks)
    for name, value in pipe.unet.down_blocks.state_dict().items():   # the copy, weights included
        assert torch.equal(value, net.down_blocks.state_dict()[name])
    assert torch.equal(pipe.unet.conv_in.weight, net.conv_in.weight)
    with pytest.raises(ValueError, match="needs 3 entries"):
        C.make_controlnet(pipe.unet, pipe.vae, embedding_channels=(8, 16))


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler"])
def test_at_initialisation_the_output_is_the_base_models(parts, scheduler):
    pipe, net = parts
    pipe.scheduler = tiny_sd.make_scheduler(scheduler)
    base = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images
    with_control = C.controlnet_pipeline(pipe, net)(
        PROMPTS, image=condition(), num_inference_steps=4, guidance_scale=3.0, output_type="pt",
        generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(base, with_control)
    ours = sd.text_to_image(pipe, PROMPTS, steps=4, guidance_scale=3.0, sampler=scheduler,
                            generator=torch.Generator().manual_seed(0),
                            denoiser=C.control_denoiser(pipe, net, condition()))
    plain = sd.text_to_image(pipe, PROMPTS, steps=4, guidance_scale=3.0, sampler=scheduler,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours, plain)


@pytest.mark.parametrize("scheduler,scale,guidance", [("dpmpp_2m", 0.7, 3.0), ("euler", 1.0, 1.0),
                                                      ("euler_ancestral", 1.5, 4.0)])
def test_the_diffkit_loop_equals_the_controlnet_pipeline(parts, scheduler, scale, guidance):
    pipe, net = parts
    live = randomised(net)
    pipe.scheduler = tiny_sd.make_scheduler(scheduler)
    theirs = C.controlnet_pipeline(pipe, live)(
        PROMPTS, image=condition(), num_inference_steps=5, guidance_scale=guidance,
        controlnet_conditioning_scale=scale, output_type="pt",
        generator=torch.Generator().manual_seed(0)).images * 2 - 1
    ours = sd.text_to_image(pipe, PROMPTS, steps=5, guidance_scale=guidance, sampler=scheduler,
                            generator=torch.Generator().manual_seed(0),
                            denoiser=C.control_denoiser(pipe, live, condition(), scale=scale))
    plain = sd.text_to_image(pipe, PROMPTS, steps=5, guidance_scale=guidance, sampler=scheduler,
                             generator=torch.Generator().manual_seed(0))
    assert float(((ours - theirs) / 2).abs().max()) <= 1e-4
    assert float((ours - plain).abs().max()) > 1e-2               # the control acts


def test_zero_convolutions_learn_first_then_the_copy(parts):
    pipe, net = parts
    net = copy.deepcopy(net).train()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    text = sd.encode_prompt(pipe, PROMPTS)
    optimiser = torch.optim.SGD(net.parameters(), lr=0.1)
    copy_weight = net.down_blocks[0].resnets[0].conv1.weight
    zero_weight = net.controlnet_down_blocks[0].weight
    for step in range(2):
        optimiser.zero_grad()
        down, middle = net(x, 500, encoder_hidden_states=text, controlnet_cond=condition(),
                           return_dict=False)
        loss = sum((r ** 2).sum() for r in down) + (middle ** 2).sum() + sum(r.sum() for r in down)
        loss.backward()
        if step == 0:
            assert zero_weight.grad.abs().max() > 0            # (dL/dr) h^T: h is not zero
            assert copy_weight.grad is None or copy_weight.grad.abs().max() == 0   # W^T dL/dr = 0
        else:
            assert copy_weight.grad.abs().max() > 0            # after one step it flows through
        optimiser.step()


def test_bad_conditions(parts):
    pipe, net = parts
    with pytest.raises(ValueError, match=r"images \(B, 3, 32, 32\)"):
        C.control_denoiser(pipe, net, condition(size=64))
    with pytest.raises(ValueError, match=r"images \(B, 3, 32, 32\)"):
        C.control_denoiser(pipe, net, condition()[:, :1])
    with pytest.raises(ValueError, match="non-negative"):
        C.control_denoiser(pipe, net, condition(), scale=-1.0)


def test_controlnet_loss_trains_the_copy_only(parts):
    from diffkit.data.shapes import make_shapes
    from diffkit.train import train

    pipe, net = parts
    unet = copy.deepcopy(pipe.unet)
    scenes = make_shapes(16, seed=5, anywhere=True)
    latents, states = tiny_sd.encode_pool(pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                          scenes.images, scenes.captions,
                                          generator=torch.Generator().manual_seed(0))
    control = C.conditions(scenes, "edges")
    assert control.shape == (16, 3, 32, 32) and set(control.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(C.conditions(scenes, "masks")[:, 0], scenes.masks.any(1).float())
    empty = tiny_sd.text_states(pipe.text_encoder, pipe.tokenizer, [""])
    loss = C.ControlNetLoss(unet, pipe.scheduler.alphas_cumprod, empty)
    frozen = {k: v.clone() for k, v in unet.state_dict().items()}
    result = train(copy.deepcopy(net), loss, (latents, states, control), steps=4, batch_size=8,
                   warmup=1, progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    for key, value in unet.state_dict().items():                  # the UNet stays frozen
        assert torch.equal(value, frozen[key])
    moved = [n for n in C.zero_modules(net) if n not in C.zero_modules(result.model)]
    assert moved                                                   # the zero convs learned
    with pytest.raises(ValueError, match="control images must be"):
        loss(net, (latents, states, control[:, :1]))
    with pytest.raises(ValueError, match="kind must be"):
        C.conditions(scenes, "depth")


@pytest.fixture(scope="module")
def adapter(parts):
    pipe, _ = parts
    torch.manual_seed(0)
    return C.make_t2i_adapter(pipe.unet, pipe.vae)


def test_the_t2i_adapter_matches_the_unets_blocks(parts, adapter):
    pipe, _ = parts
    features = adapter(condition())
    # one feature per down block, its width and resolution (latent 8 x 8, then 4 x 4)
    assert [tuple(f.shape[1:]) for f in features] == [(32, 8, 8), (64, 4, 4)]
    adapter_size = sum(p.numel() for p in adapter.parameters())
    copy_size = sum(p.numel() for p in parts[1].parameters())
    assert adapter_size < copy_size / 2                          # no copy of the encoder
    assert not any(isinstance(m, torch.nn.Linear) for m in adapter.modules())   # no text, no t


@pytest.mark.parametrize("scheduler,scale,guidance", [("dpmpp_2m", 0.8, 3.0),
                                                      ("euler", 1.0, 1.0)])
def test_the_diffkit_loop_equals_the_adapter_pipeline(parts, adapter, scheduler, scale, guidance):
    pipe, _ = parts
    pipe.scheduler = tiny_sd.make_scheduler(scheduler)
    run = dict(steps=5, guidance_scale=guidance, sampler=scheduler)
    # this pipeline decodes the old way: output_type "np" gives (B, H, W, 3) in [0, 1]
    theirs = C.adapter_pipeline(pipe, adapter)(
        PROMPTS, image=condition(), num_inference_steps=5, guidance_scale=guidance,
        adapter_conditioning_scale=scale, output_type="np",
        generator=torch.Generator().manual_seed(0)).images
    theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2) * 2 - 1
    ours = sd.text_to_image(pipe, PROMPTS, generator=torch.Generator().manual_seed(0),
                            denoiser=C.make_denoiser(pipe, adapter, condition(), scale=scale),
                            **run)
    plain = sd.text_to_image(pipe, PROMPTS, generator=torch.Generator().manual_seed(0), **run)
    off = sd.text_to_image(pipe, PROMPTS, generator=torch.Generator().manual_seed(0),
                           denoiser=C.adapter_denoiser(pipe, adapter, condition(), scale=0.0),
                           **run)
    assert float(((ours - theirs) / 2).abs().max()) <= 1e-4
    assert float((ours - plain).abs().max()) > 1e-2               # the adapter acts (not zero-init)
    assert torch.equal(off, plain)                                 # scale 0: the base model


def test_bad_adapter_inputs(parts, adapter):
    pipe, _ = parts
    with pytest.raises(ValueError, match=r"images \(B, 3, 32, 32\)"):
        C.adapter_denoiser(pipe, adapter, condition(size=64))
    with pytest.raises(ValueError, match="non-negative"):
        C.make_denoiser(pipe, adapter, condition(), scale=-0.5)
    with pytest.raises(ValueError, match="ControlNetModel or a T2IAdapter"):
        C.make_denoiser(pipe, pipe.unet, condition())


def test_the_loss_trains_an_adapter(parts, adapter):
    from diffkit.data.shapes import make_shapes
    from diffkit.train import train

    pipe, _ = parts
    scenes = make_shapes(16, seed=6, anywhere=True)
    latents, states = tiny_sd.encode_pool(pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                          scenes.images, scenes.captions,
                                          generator=torch.Generator().manual_seed(0))
    unet = copy.deepcopy(pipe.unet)
    empty = tiny_sd.text_states(pipe.text_encoder, pipe.tokenizer, [""])
    loss = C.ControlNetLoss(unet, pipe.scheduler.alphas_cumprod, empty)
    live = copy.deepcopy(adapter)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    result = train(live, loss, (latents, states, C.conditions(scenes, "masks")), steps=3,
                   batch_size=8, warmup=1, progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert any(not torch.equal(v, before[k]) for k, v in result.model.state_dict().items())
