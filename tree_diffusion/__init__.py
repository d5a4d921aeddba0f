"""tree_diffusion: TreeVAE + path-conditioned diffusion (TreeDiffusion) in JAX/Flax."""

__version__ = "0.2.0"
