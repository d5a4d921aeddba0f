"""Evaluation: clustering metrics, the FID Inception and Fréchet distance, the per-leaf purity
classifier, the importance-sampled log-likelihood, and batch evaluation of run directories."""
