"""diffkit.eval.latent_cost: FLOPs, saved activations and time of pixel vs latent UNet steps."""

import torch

from diffkit import bench
from diffkit.eval import latent_cost


def test_flops_of_a_linear_layer_are_counted_exactly():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8)

    class Wrapped(torch.nn.Module):       # the (x, t) -> .sample interface of the UNets
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, t):
            return type("Out", (), {"sample": self.layer(x)})()

    model = Wrapped()
    assert latent_cost.forward_flops(model, x) == 2 * 5 * 8 * 4
    # backward: the weight's gradient, as large as the forward product (x needs no gradient;
    # inside a deep network every layer but the first also computes its input's, hence ~3x)
    assert latent_cost.training_step_flops(model, x) == 2 * 2 * 5 * 8 * 4
    # saved for backward: the input x (the weight is not counted)
    assert latent_cost.saved_activation_bytes(model, x) == x.numel() * 4


def test_pixel_step_costs_more_than_the_ratio_of_numbers():
    cost = latent_cost.tiny_comparison(batch=2, timing=False)
    assert cost["ratio"]["numbers"] == 12
    # convolutions scale with spatial positions (16x), attention with their square
    assert 12 < cost["ratio"]["training_gflops"] < 20
    assert cost["ratio"]["activation_mib"] > 12
    assert abs(cost["pixel"]["parameters"] - cost["latent"]["parameters"]) < 1000  # same UNet


def test_sd15_counts_on_the_meta_device():
    cost = latent_cost.sd15_comparison()
    assert 850e6 < cost["latent"]["parameters"] < 870e6      # SD 1.5's UNet: 860 M
    assert 0.5 < cost["latent"]["forward_tflops"] < 1.2      # ~0.8 TFLOPs per 64x64 step
    assert cost["ratio"]["forward_tflops"] > 480


def test_latent_bench_quick_runs():
    figures = bench.BENCHES["latent"](torch.device("cpu"), True)
    # speed is recorded, not asserted: only that the bench measures both sides
    assert figures["pixel"]["seconds_per_step"] > 0 and figures["latent"]["seconds_per_step"] > 0
    assert figures["pixel"]["batch"] == figures["latent"]["batch"] == 16
    assert all(isinstance(v, dict) for v in figures.values())   # the performance page's layout
