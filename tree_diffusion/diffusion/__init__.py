"""Stage 2: the path-conditioned diffusion model (not implemented yet)."""
