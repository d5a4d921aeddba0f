"""tree_diffusion: TreeVAE + path-conditioned diffusion (TreeDiffusion) in JAX/Flax.

``tree_diffusion.load_run(workdir)`` loads a trained run (:mod:`tree_diffusion.diffusion.trained`);
the modules are imported when first used, so that importing the package configures nothing in JAX.
"""

__version__ = "0.2.0"


def __getattr__(name):
  if name in ("load_run", "TrainedRun"):
    from tree_diffusion.diffusion import trained  # pylint: disable=g-import-not-at-top

    return getattr(trained, name)
  raise AttributeError(f"module 'tree_diffusion' has no attribute {name!r}")
