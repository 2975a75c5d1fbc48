"""Headless training of the misalignment model on top of the Lib: data, dense sampling, training, checkpoints, export."""
