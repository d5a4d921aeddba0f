"""Evaluation: the FID Inception and Fréchet distance, the per-leaf purity classifier, the
importance-sampled log-likelihood, and batch evaluation of run directories (the clustering
metrics, which stage 1 reports too, are ``tree_diffusion/clustering.py``)."""
