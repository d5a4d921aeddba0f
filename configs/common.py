"""Shared defaults of every config: stage-1 (TreeVAE), stage-2 (diffusion, placeholder) and eval.

Each dataset file calls :func:`base` and overrides fields. Values are those of the reference
configs (``reference/treevae.md`` §7.2) unless a comment says otherwise.
"""

import ml_collections


def parse_arg(arg):
  """``"tiny,seed=3"`` → ``{"tiny": True, "seed": "3"}`` (big_vision style config suffix)."""
  out = {}
  for part in filter(None, (arg or "").split(",")):
    k, _, v = part.partition("=")
    out[k.strip()] = v.strip() if v else True
  return out


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict(dict(
      name="mnist", image_size=28, channels=1, data_dir="", folder="", test_fraction=0.1,
      resize=False, seed=0))

  # CNN-TreeVAE architecture; lists run from the input side (level 0) to the root.
  c.treevae = ml_collections.ConfigDict(dict(
      encoder="cnn1", latent_channels=[16] * 7, bottom_up_channels=[32] * 7,
      representation_dim=2, res_connections=False, act="swish", output="sigmoid",
      dropout_router=0.0))

  # Stage-1 training schedule and optimiser (Adam + coupled L2, StepLR per epoch, per phase).
  c.stage1 = ml_collections.ConfigDict(dict(
      seed=42, batch_size=256, eval_batch_size=500, lr=1e-3, weight_decay=1e-5, decay_lr=0.1,
      decay_stepsize=100,
      num_epochs=150,                          # initial root + 2 leaves
      num_epochs_smalltree=150,                # each new 2-leaf subtree
      intermediate_fulltrain=True, num_epochs_intermediate_fulltrain=80,  # every 3 splits
      num_epochs_finetuning=200,
      kl_start=0.0, decay_kl=0.001,
      initial_depth=1, grow=True, prune=True, num_clusters_tree=10, max_growth_iterations=150,
      augment=False, augmentation_method="simple", augmentation="none", aug_decisions_weight=1.0,
      log_every_epochs=1, eval_every_epochs=10, checkpoints_to_keep=3,
      figure_images_per_leaf=6, kmeans_baseline=True, final_elbo=True))

  # Stage 2 and evaluation are filled in by their own issues.
  c.diffusion = ml_collections.ConfigDict(dict(conditioning="path"))
  c.eval = ml_collections.ConfigDict(dict(batch_size=500))
  return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A variant that runs end to end on CPU in seconds (tests and smoke runs)."""
  c.treevae.latent_channels = [2] * 4
  c.treevae.bottom_up_channels = [4] * 4
  s = c.stage1
  s.batch_size = 8
  s.eval_batch_size = 16
  s.num_epochs = 1
  s.num_epochs_smalltree = 1
  s.num_epochs_intermediate_fulltrain = 1
  s.num_epochs_finetuning = 1
  s.num_clusters_tree = 3
  s.eval_every_epochs = 1
  s.figure_images_per_leaf = 2
  s.kmeans_baseline = False
  return c
