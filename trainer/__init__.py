"""Headless training of the misalignment model: phantom, synthetic deformations, sampling, training, export."""
