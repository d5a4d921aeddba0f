"""Evaluation: clustering metrics, the Fréchet distance (and, later, Inception features,
classifier purity, likelihood)."""
