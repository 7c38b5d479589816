"""Measuring models: distances, judges and their reports, sampler-error measures, probes."""
