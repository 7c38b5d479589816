"""Networks with weights: the timestep embedding, the MLP and UNet denoisers, attention, classifiers."""
