"""Inference: whole-volume prediction (slices, sliding windows) of a trained model."""
