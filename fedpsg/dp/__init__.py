"""Differential privacy: the accountant, the Gaussian mechanism, secret randomness, per-example gradients."""
