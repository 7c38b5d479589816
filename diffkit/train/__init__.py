"""The training loop (:mod:`diffkit.train.loop`); ``python -m diffkit.train RECIPE`` is its
command line (:mod:`diffkit.train.__main__`), the only part that knows the recipes."""

from diffkit.train.loop import TrainResult, load_state, save_state, train  # noqa: F401
