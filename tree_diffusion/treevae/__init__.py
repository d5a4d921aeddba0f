"""Stage 1: the CNN-TreeVAE (networks, model, losses, growing/pruning rules, training)."""
