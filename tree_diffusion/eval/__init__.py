"""Evaluation: clustering metrics (and, later, FID, classifier purity, likelihood)."""
