"""The classifier behind the per-leaf purity of generated images (the reference's sample_all_leaves
evaluation).

The reference trains one classifier per dataset on the raw ``[0, 1]`` images at their native size
(Adam, lr 1e-3, 50 epochs, batch 32), then, for the ``sample_all_leaves`` output (every prior sample
decoded through every leaf), keeps for each leaf the images whose probability of reaching that leaf
is at least a threshold, classifies them and plots the normalised histogram of predicted classes.

Here:

* :class:`ResNet` is a small-image ResNet (standard basic blocks, BatchNorm, a 3×3 stem and no
  max-pool) with configurable ``stage_sizes`` and ``width``. **Deliberate deviation:** the reference
  fine-tunes torchvision's ImageNet-pretrained ResNet-50; pretrained weights are not available
  offline, so this classifier is trained from scratch (and is much smaller). Its test accuracy is
  stored next to it and should be reported with every purity figure.
* :func:`train_classifier` trains it data-parallel over the mesh axis ``"data"`` (batch sharded,
  parameters replicated, train state donated); :func:`predict` classifies any number of images with
  one compiled, padded batch shape.
* :func:`save_classifier` / :func:`load_classifier` store ``classifier.msgpack`` (flax
  serialization of the variables) and ``classifier.json`` (dataset, image shape, classes, model
  settings, test accuracy, config), each written atomically.
* the purity metric and its figure, computed from this classifier's predictions, are
  :mod:`tree_diffusion.eval.purity`.

The module is the life of one network (model, training, saving, predictions), hence its length.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from tree_diffusion import data as data_lib
from tree_diffusion import files, loop, sharding
from tree_diffusion.errors import ConfigError
from tree_diffusion.loop import TrainState
from tree_diffusion.runs import RunDir, format_eta

PyTree = Any
AUGMENTATIONS = ("none", "flip", "shift", "flip+shift")
LR_SCHEDULES = ("constant", "cosine")
FORMAT = "tree_diffusion.classifier/1"
WEIGHTS_FILE = "classifier.msgpack"
META_FILE = "classifier.json"
_SHIFT = 2  # pixels of the "shift" augmentation (zero padding, then a random crop)


def train_command(config_path: str = "<config>", workdir: str = "<workdir>") -> str:
  """The command that trains a classifier (named in the errors of :func:`load_classifier`)."""
  return f"python -m launch.train_classifier --config={config_path} --workdir={workdir}"


# ------------------------------------------------------------------------------------- the model


class BasicBlock(nn.Module):
  """Two 3×3 conv + BatchNorm layers with an identity (or 1×1 projection) shortcut."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5
    )
    conv = functools.partial(nn.Conv, use_bias=False)
    y = conv(self.features, (3, 3), strides=self.strides, padding=((1, 1), (1, 1)))(x)
    y = nn.relu(norm()(y))
    y = conv(self.features, (3, 3), padding=((1, 1), (1, 1)))(y)
    # The last BatchNorm of a block starts at 0: every block starts as the identity.
    y = norm()(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = norm()(conv(self.features, (1, 1), strides=self.strides)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A ResNet for 8–64 px images: 3×3 stem, stages of :class:`BasicBlock`, global average pool.

  Stage ``i`` has ``width · 2^i`` channels and (from the second stage on) halves the resolution.
  Input: float ``[N, H, W, C]`` in ``[0, 1]`` (C = 1 or 3); output: ``[N, num_classes]`` logits.
  """

  num_classes: int
  stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
  width: int = 64

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(images)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        x = BasicBlock(self.width * 2**i, strides=2 if i > 0 and j == 0 else 1)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))

  def settings(self) -> dict:
    return {
      "num_classes": self.num_classes,
      "stage_sizes": list(self.stage_sizes),
      "width": self.width,
    }


def make_model(classifier_config, num_classes: int) -> ResNet:
  """The :class:`ResNet` of ``config.classifier`` (validated)."""
  stages = tuple(int(s) for s in classifier_config.stage_sizes)
  if not stages or min(stages) < 1:
    raise ConfigError(
      f"classifier.stage_sizes must be a non-empty list of positive ints, got "
      f"{classifier_config.stage_sizes!r}; e.g. --config.classifier.stage_sizes="
      f"'(2, 2, 2)'"
    )
  if int(classifier_config.width) < 1:
    raise ConfigError(
      f"classifier.width must be positive, got {classifier_config.width}; e.g. "
      f"--config.classifier.width=32"
    )
  return ResNet(
    num_classes=int(num_classes), stage_sizes=stages, width=int(classifier_config.width)
  )


def init_variables(model: ResNet, key: jax.Array, image_shape: Sequence[int]) -> PyTree:
  """``{"params", "batch_stats"}`` for images of ``image_shape`` (H, W, C)."""
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  return jax.jit(lambda k: model.init(k, x, train=False))(key)


# ------------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the train step (hashable)."""

  lr: float = 1e-3
  lr_schedule: str = "constant"
  total_steps: int = 1
  augment: str = "none"

  @classmethod
  def from_config(cls, c, total_steps: int) -> "StepConfig":
    if c.augment not in AUGMENTATIONS:
      raise ConfigError(f"unknown classifier.augment {c.augment!r}; use one of {AUGMENTATIONS}")
    if c.lr_schedule not in LR_SCHEDULES:
      raise ConfigError(
        f"unknown classifier.lr_schedule {c.lr_schedule!r}; use one of {LR_SCHEDULES}"
      )
    if not c.lr > 0:
      raise ConfigError(f"classifier.lr must be positive, got {c.lr}")
    return cls(
      lr=float(c.lr), lr_schedule=c.lr_schedule, total_steps=int(total_steps), augment=c.augment
    )


def make_optimizer(cfg: StepConfig) -> optax.GradientTransformation:
  """Adam at ``lr`` (the reference), or with a cosine decay to 0 over ``total_steps``."""
  if cfg.lr_schedule == "cosine":
    return optax.adam(optax.cosine_decay_schedule(cfg.lr, max(cfg.total_steps, 1)))
  return optax.adam(cfg.lr)


def augment_images(key: jax.Array, images: jax.Array, augment: str) -> jax.Array:
  """Random left-right flips and/or shifts by up to ``_SHIFT`` pixels (zero fill), per image."""
  if augment == "none":
    return images
  n, h, w, _ = images.shape
  k_flip, k_shift = jax.random.split(key)
  if "flip" in augment:
    flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
    images = jnp.where(flip, images[:, :, ::-1], images)
  if "shift" in augment:
    s = _SHIFT
    padded = jnp.pad(images, ((0, 0), (s, s), (s, s), (0, 0)))
    offsets = jax.random.randint(k_shift, (n, 2), 0, 2 * s + 1)
    crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1]))
    images = jax.vmap(crop)(padded, offsets)
  return images


@functools.partial(jax.jit, static_argnames=("model", "cfg"), donate_argnums=0)
def train_step(
  state: TrainState,
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  *,
  model: ResNet,
  cfg: StepConfig,
):
  """One Adam step on the mean cross-entropy of a batch; returns ``(state, metrics)``."""
  images = augment_images(jax.random.fold_in(key, state.step), images, cfg.augment)

  def loss_fn(params):
    logits, updates = model.apply(
      {"params": params, "batch_stats": state.batch_stats},
      images,
      train=True,
      mutable=["batch_stats"],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return TrainState(
    step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
  ), {"loss": loss, "accuracy": accuracy}


@dataclasses.dataclass(frozen=True, eq=False)
class Classifier:
  """A trained classifier: the module, its variables and what it was trained on.

  ``meta`` holds at least ``dataset``, ``image_shape`` [H, W, C], ``num_classes``,
  ``class_names``, ``model`` (the :class:`ResNet` settings) and ``test_accuracy``.
  """

  model: ResNet
  variables: PyTree
  meta: Mapping[str, Any]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(int(s) for s in self.meta["image_shape"])

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.meta.get("class_names", ()))


def _check_labelled(arrays: data_lib.Arrays, split: str) -> None:
  if arrays.num_classes == 0 or (len(arrays) and int(arrays.labels.min()) < 0):
    raise ConfigError(
      f"the dataset has no labels; a classifier needs labels (the {split} split "
      f"has none): use a labelled dataset, e.g. a folder with one subfolder per "
      f"class"
    )
  if arrays.num_classes < 2:
    raise ConfigError(
      f"the dataset has {arrays.num_classes} class; a classifier needs at least two classes"
    )
  if len(arrays) and int(arrays.labels.max()) >= arrays.num_classes:
    raise ConfigError(
      f"the {split} labels reach {int(arrays.labels.max())} but the dataset has "
      f"{arrays.num_classes} classes"
    )


def train_classifier(
  config,
  train_arrays: data_lib.Arrays,
  test_arrays: data_lib.Arrays | None = None,
  *,
  mesh=None,
  log: Callable[[str], None] = logging.info,
) -> tuple[Classifier, dict]:
  """Trains ``config.classifier``'s ResNet on ``train_arrays`` and evaluates it on ``test_arrays``.

  Args:
    config: the whole config (``config.classifier`` and ``config.data.name`` are read).
    train_arrays: the labelled training split (uint8 images).
    test_arrays: the split to evaluate on at the end (and every ``eval_every_epochs``); None skips.
    mesh: the ``("data",)`` mesh; default: all devices.
    log: where progress lines go.

  Returns:
    ``(classifier, metrics)``: metrics has ``test_accuracy`` and ``per_class_accuracy`` (float64
    Python floats, or None without a test split), ``steps``, ``epochs``, ``parameters``,
    ``wall_time_s`` and ``train_images_per_second``; ``classifier.meta`` repeats them.

  Raises:
    ConfigError: unlabelled data, too few images for one batch, bad settings.
  """
  c = config.classifier
  t_run = time.perf_counter()
  _check_labelled(train_arrays, "train")
  if test_arrays is not None:
    _check_labelled(test_arrays, "test")
    if test_arrays.images.shape[1:] != train_arrays.images.shape[1:]:
      raise ConfigError(
        f"train and test images differ in shape: {train_arrays.images.shape[1:]} "
        f"vs {test_arrays.images.shape[1:]}"
      )
  mesh = mesh or sharding.make_mesh()
  sharding.check_batch_size(c.batch_size, mesh, setting="classifier.batch_size")
  steps_per_epoch = data_lib.num_batches(len(train_arrays), c.batch_size, drop_remainder=True)
  if steps_per_epoch == 0:
    raise ConfigError(
      f"{len(train_arrays)} training images are fewer than one batch of "
      f"{c.batch_size}; lower --config.classifier.batch_size"
    )
  num_steps = int(c.get("num_steps", 0))
  total = num_steps if num_steps > 0 else int(c.num_epochs) * steps_per_epoch
  if total <= 0:
    raise ConfigError("classifier.num_epochs (or classifier.num_steps) must be positive")
  cfg = StepConfig.from_config(c, total)
  model = make_model(c, train_arrays.num_classes)
  image_shape = train_arrays.images.shape[1:]

  key = jax.random.key(c.seed)
  variables = init_variables(model, jax.random.fold_in(key, 1), image_shape)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    opt_state=make_optimizer(cfg).init(variables["params"]),
  )
  state = sharding.replicate(state, mesh)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  log(
    f"classifier: ResNet stages {list(model.stage_sizes)}, width {model.width}, "
    f"{n_params:,} parameters; {total} steps ({steps_per_epoch} per epoch of "
    f"{len(train_arrays)} images), batch {c.batch_size}, augment {c.augment}"
  )

  step_key = jax.random.fold_in(key, 2)
  log_every = max(int(c.get("log_every_steps", 100)), 1)
  eval_every = int(c.get("eval_every_epochs", 0))
  step, sums, n_sum = 0, None, 0
  progress = loop.Progress(total, c.batch_size)
  while step < total:
    epoch = step // steps_per_epoch
    for batch in data_lib.batches(
      train_arrays, c.batch_size, shuffle=True, seed=c.seed, epoch=epoch, drop_remainder=True
    ):
      if step >= total:
        break
      b = sharding.put_global({"image": batch["image"], "label": batch["label"]}, mesh)
      state, metrics = train_step(state, b["image"], b["label"], step_key, model=model, cfg=cfg)
      step += 1
      sums = metrics if sums is None else jax.tree_util.tree_map(jnp.add, sums, metrics)
      n_sum += 1
      if step % log_every == 0 or step == total:
        loss, acc = float(sums["loss"]) / n_sum, float(sums["accuracy"]) / n_sum
        loop.check_finite(
          loss,
          f"the classifier at step {step} (mean loss {loss:.4g})",
          "Lower --config.classifier.lr or check the data",
        )
        ips, eta = progress.report(step)  # the first window includes compilation
        log(
          f"classifier step {step}/{total} (epoch {step / steps_per_epoch:.2f}): loss "
          f"{loss:.4f}, train accuracy {acc:.4f} | {ips:.0f} img/s, ETA {format_eta(eta)}"
        )
        sums, n_sum = None, 0
    if (
      eval_every > 0
      and test_arrays is not None
      and step < total
      and (step // steps_per_epoch) % eval_every == 0
    ):
      t_eval = time.perf_counter()
      variables = {"params": state.params, "batch_stats": state.batch_stats}
      acc = evaluate(model, variables, test_arrays, c.eval_batch_size, mesh=mesh)["accuracy"]
      log(f"classifier epoch {step // steps_per_epoch}: test accuracy {acc:.4f}")
      progress.pause(time.perf_counter() - t_eval)  # not training: out of img/s and the ETA

  variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  metrics = {"test_accuracy": None, "per_class_accuracy": None}
  if test_arrays is not None:
    ev = evaluate(model, variables, test_arrays, c.eval_batch_size, mesh=mesh)
    metrics = {
      "test_accuracy": ev["accuracy"],
      "per_class_accuracy": ev["per_class_accuracy"],
      "test_images": len(test_arrays),
    }
    log(f"classifier: test accuracy {ev['accuracy']:.4f} on {len(test_arrays)} images")
  metrics.update(
    steps=step,
    epochs=step / steps_per_epoch,
    parameters=n_params,
    wall_time_s=time.perf_counter() - t_run,
    train_images_per_second=progress.median_rate(),
  )
  meta = {
    "dataset": str(config.data.name),
    "image_shape": [int(s) for s in image_shape],
    "num_classes": int(train_arrays.num_classes),
    "class_names": list(train_arrays.class_names),
    "model": model.settings(),
    **metrics,
    "classifier_config": json.loads(c.to_json_best_effort())
    if hasattr(c, "to_json_best_effort")
    else dict(c),
  }
  return Classifier(model, variables, meta), metrics


# ------------------------------------------------------------------------------------- inference


@functools.partial(jax.jit, static_argnames=("model",))
def _probabilities(variables: PyTree, images: jax.Array, *, model: ResNet) -> jax.Array:
  return jax.nn.softmax(model.apply(variables, images, train=False).astype(jnp.float32), -1)


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 → ``x / 255`` (as ``data.batches``); floats are clipped to ``[0, 1]``."""
  if images.dtype == np.uint8:
    return images.astype(np.float32) / np.float32(255.0)
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
  return np.clip(images.astype(np.float32), 0.0, 1.0)


def predict(
  model: ResNet, variables: PyTree, images: np.ndarray, batch_size: int = 500, *, mesh=None
) -> tuple[np.ndarray, np.ndarray]:
  """Classifies ``[N, H, W, C]`` images (uint8, or float in ``[0, 1]``).

  Every batch, the last one zero-padded, has ``batch_size`` rows (rounded up to a multiple of the
  device count), so one compilation serves any N.

  Returns:
    ``(labels int32 [N], probabilities float32 [N, num_classes])``.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
  mesh = mesh or sharding.make_mesh()
  batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size  # padded, never refused
  variables = sharding.replicate(variables, mesh)
  n = images.shape[0]
  probs = np.zeros((n, model.num_classes), np.float32)
  for start in range(0, n, batch_size):
    chunk = to_float(images[start : start + batch_size])
    real = chunk.shape[0]
    if real < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - real,) + chunk.shape[1:], np.float32)])
    x = sharding.put_global(chunk, mesh)  # this process's rows; the result gathered
    probs[start : start + real] = sharding.to_host(_probabilities(variables, x, model=model))[:real]
  return probs.argmax(-1).astype(np.int32), probs


def evaluate(
  model: ResNet, variables: PyTree, arrays: data_lib.Arrays, batch_size: int = 500, *, mesh=None
) -> dict:
  """Accuracy and per-class accuracy (float64 Python floats; None for a class with no image)."""
  pred, _ = predict(model, variables, arrays.images, batch_size, mesh=mesh)
  labels = arrays.labels.astype(np.int64)
  correct = (pred == labels).astype(np.float64)
  per_class = []
  for k in range(model.num_classes):
    rows = labels == k
    per_class.append(float(correct[rows].mean()) if rows.any() else None)
  return {
    "accuracy": float(correct.mean()) if correct.size else None,
    "per_class_accuracy": per_class,
  }


def classify_all_leaves(
  classifier: Classifier, images: np.ndarray, batch_size: int = 500, *, mesh=None
) -> tuple[np.ndarray, np.ndarray]:
  """Classifies ``sample_all_leaves`` images ``[N, K, H, W, C]``.

  Returns:
    ``(predicted int32 [N, K], probabilities float32 [N, K, num_classes])``.
  """
  images = np.asarray(images)
  if images.ndim != 5 or images.shape[2:] != classifier.image_shape:
    raise ValueError(
      f"images must be [N, K, {', '.join(map(str, classifier.image_shape))}], got "
      f"shape {images.shape}"
    )
  n, k = images.shape[:2]
  pred, probs = predict(
    classifier.model,
    classifier.variables,
    images.reshape((n * k,) + images.shape[2:]),
    batch_size,
    mesh=mesh,
  )
  return pred.reshape(n, k), probs.reshape(n, k, -1)


# ------------------------------------------------------------------------------------- save / load


def classifier_dir(classifier_config, workdir: str) -> str:
  """``config.classifier.dir`` (``classifier_config`` is ``config.classifier``) or, when empty,
  ``WORKDIR/classifier``."""
  return classifier_config.dir or RunDir(workdir).classifier


def save_classifier(directory: str, classifier: Classifier) -> str:
  """Writes ``classifier.msgpack`` then ``classifier.json`` (each atomically); returns the dir.

  The JSON holds the SHA-256 of the weights, so a half-overwritten pair is detected on load.
  """
  files.makedirs(directory)
  weights = flax.serialization.to_bytes(jax.device_get(classifier.variables))
  meta = {
    "format": FORMAT,
    **classifier.meta,
    "model": classifier.model.settings(),
    "weights_sha256": hashlib.sha256(weights).hexdigest(),
  }
  files.write_bytes(files.join(directory, WEIGHTS_FILE), weights)
  files.write_text(files.join(directory, META_FILE), json.dumps(meta, indent=2, allow_nan=False))
  return directory


def _shape_str(shape: Sequence[int]) -> str:
  return "x".join(str(int(s)) for s in shape)


def load_classifier(
  directory: str,
  *,
  image_shape: Sequence[int] | None = None,
  num_classes: int | None = None,
  train_hint: str | None = None,
) -> Classifier:
  """Loads what :func:`save_classifier` wrote and checks it against what the caller needs.

  Args:
    directory: the classifier directory.
    image_shape: the (H, W, C) the caller will classify; None skips the check.
    num_classes: the number of classes the caller expects; None skips the check.
    train_hint: the command that trains a suitable classifier (default: the generic one).

  Raises:
    ConfigError: (one line, naming how to train one) missing or unreadable files, another format,
      or a different image shape or class count.
  """
  hint = train_hint or train_command()
  meta_path = files.join(directory, META_FILE)
  weights_path = files.join(directory, WEIGHTS_FILE)
  if not files.exists(meta_path) or not files.exists(weights_path):
    raise ConfigError(
      f"no classifier in {directory} (no {META_FILE} and {WEIGHTS_FILE}); train "
      f"one with: {hint} (or point --config.classifier.dir at one)"
    )
  meta = files.read_json(meta_path)
  if meta.get("format") != FORMAT:
    raise ConfigError(
      f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}; retrain with: {hint}"
    )
  got_shape = tuple(int(s) for s in meta["image_shape"])
  if image_shape is not None and got_shape != tuple(int(s) for s in image_shape):
    raise ConfigError(
      f"the classifier in {directory} was trained on {_shape_str(got_shape)} "
      f"images ({meta.get('dataset')}) but {_shape_str(image_shape)} are needed; "
      f"train one for this dataset with: {hint}"
    )
  if num_classes is not None and int(meta["num_classes"]) != int(num_classes):
    raise ConfigError(
      f"the classifier in {directory} has {meta['num_classes']} classes "
      f"({meta.get('dataset')}) but {num_classes} are needed; train one for this "
      f"dataset with: {hint}"
    )
  weights = files.read_bytes(weights_path)
  if hashlib.sha256(weights).hexdigest() != meta.get("weights_sha256"):
    raise ConfigError(
      f"{weights_path} does not match {meta_path} (an interrupted save?); retrain with: {hint}"
    )
  m = meta["model"]
  model = ResNet(
    num_classes=int(m["num_classes"]), stage_sizes=tuple(m["stage_sizes"]), width=int(m["width"])
  )
  template = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1,) + got_shape, jnp.float32))
  )
  variables = flax.serialization.msgpack_restore(weights)
  want = jax.tree_util.tree_map(lambda a: (a.shape, np.dtype(a.dtype)), template)
  got = jax.tree_util.tree_map(lambda a: (a.shape, np.dtype(a.dtype)), variables)
  if want != got:
    raise ConfigError(
      f"{weights_path} does not hold the variables of the ResNet described in "
      f"{meta_path}; retrain with: {hint}"
    )
  return Classifier(model, variables, meta)


def load_for_config(config, workdir: str, config_path: str = "<config>") -> Classifier:
  """Loads the classifier of ``config`` (``classifier_dir``), checked against ``config.data``
  (image shape and dataset name)."""
  shape = (config.data.image_size, config.data.image_size, config.data.channels)
  hint = train_command(config_path, workdir)
  directory = classifier_dir(config.classifier, workdir)
  classifier = load_classifier(directory, image_shape=shape, train_hint=hint)
  if classifier.meta.get("dataset") != config.data.name:
    raise ConfigError(
      f"the classifier in {directory} was trained on "
      f"{classifier.meta.get('dataset')}, not {config.data.name}; train one for "
      f"this dataset with: {hint}"
    )
  return classifier
