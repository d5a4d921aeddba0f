"""On-device, jittable, batched image augmentations for the contrastive TreeVAE.

Images are float32 NHWC arrays with values in ``[0, 1]``. The pipeline reproduces the semantics
of the torchvision transforms used by the reference (``RandomResizedCrop`` ->
``RandomHorizontalFlip`` -> ``RandomApply([ColorJitter], p)`` -> ``RandomGrayscale``), not its
bits: every image draws its own parameters from its own PRNG key (one ``uniform`` vector per image,
from which crop sizes, offsets, factors and the jitter order are all derived), so a whole batch is
augmented in one vectorised, jitted call.

Everything that changes the *structure* of the computation (which ops run, probabilities that are
exactly 0 or 1, jitter strengths) lives in the frozen, hashable :class:`AugmentConfig`, which is
passed as a static argument to ``jax.jit``. Everything random is drawn with ``jax.random`` from
explicit keys; there is no Python-side randomness and no global state.

Deviations from torchvision, all deliberate:

* ``RandomResizedCrop`` retries its draw up to 10 times and then falls back to a central crop;
  here a single draw is made and the crop width/height are clipped to the image. Draws that
  torchvision would reject (large area with a non-unit ratio, e.g. area 1 and ratio 4/3 on a square
  image) become full-width or full-height crops with a slightly smaller area and ratio closer to 1,
  so such crops are somewhat over-represented compared with torchvision.
* The resize is bilinear with half-pixel centres (``align_corners=False``). A crop is never larger
  than the image, so the resize only ever upsamples and torchvision's antialias flag is moot.
* Grayscale uses the ITU-R 601 weights ``(0.299, 0.587, 0.114)``; torchvision uses ``0.2989`` for
  red (a difference of 1e-4 of the red value).
* ``ColorJitter`` applies its four ops in a random order per image, as torchvision does, but the
  permutation only ranges over the ops whose strength is non-zero (the disabled ops are identities,
  so the distribution over outcomes is the same).
* ``augment`` skips the crop entirely when ``crop_scale == crop_ratio == (1, 1)`` (the ``NONE``
  preset), so that preset is an exact identity for non-square images too.

The module is long because each torchvision transform it reproduces needs its own sampling rule
and its own exact-identity case; they run as one jitted pipeline, so they stay together.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

# ITU-R BT.601 luma weights (R, G, B).
_LUMA = (0.299, 0.587, 0.114)


# ----------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Static description of the augmentation pipeline (hashable; a static ``jit`` argument).

  Attributes:
    crop_scale: Range of the crop's area as a fraction of the image area (RandomResizedCrop).
    crop_ratio: Range of the crop's aspect ratio ``width / height``; sampled log-uniformly.
    flip: Whether to flip horizontally with probability 0.5.
    jitter_p: Probability of applying colour jitter to an image.
    brightness: Brightness strength ``s``; factor uniform in ``[max(0, 1 - s), 1 + s]``.
    contrast: Contrast strength; same factor range as brightness.
    saturation: Saturation strength; same factor range as brightness.
    hue: Hue strength ``h`` in ``[0, 0.5]``; shift uniform in ``[-h, h]`` turns.
    grayscale_p: Probability of converting an image to grayscale.
  """

  crop_scale: tuple[float, float] = (1.0, 1.0)
  crop_ratio: tuple[float, float] = (1.0, 1.0)
  flip: bool = False
  jitter_p: float = 0.0
  brightness: float = 0.0
  contrast: float = 0.0
  saturation: float = 0.0
  hue: float = 0.0
  grayscale_p: float = 0.0

  def __post_init__(self):
    lo, hi = self.crop_scale
    if not 0.0 < lo <= hi <= 1.0:
      raise ValueError(f'crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}')
    lo, hi = self.crop_ratio
    if not 0.0 < lo <= hi:
      raise ValueError(f'crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}')
    for name in ('jitter_p', 'grayscale_p'):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f'{name} must be in [0, 1], got {getattr(self, name)}')
    for name in ('brightness', 'contrast', 'saturation'):
      if getattr(self, name) < 0.0:
        raise ValueError(f'{name} must be non-negative, got {getattr(self, name)}')
    if not 0.0 <= self.hue <= 0.5:
      raise ValueError(f'hue must be in [0, 0.5], got {self.hue}')


CIFAR = AugmentConfig(
  crop_scale=(0.2, 1.0),
  crop_ratio=(3 / 4, 4 / 3),
  flip=True,
  jitter_p=0.8,
  brightness=0.4,
  contrast=0.4,
  saturation=0.4,
  hue=0.1,
  grayscale_p=0.2,
)
CELEBA = AugmentConfig(
  crop_scale=(0.75, 1.0),
  crop_ratio=(0.8, 1.25),
  flip=True,
  jitter_p=0.8,
  brightness=0.2,
  contrast=0.2,
  saturation=0.2,
  hue=0.0,
  grayscale_p=0.0,
)
NONE = AugmentConfig()

_PRESETS = {'cifar': CIFAR, 'celeba': CELEBA, 'none': NONE}


def get(name: str) -> AugmentConfig:
  """Returns the preset called ``name`` ('cifar', 'celeba' or 'none', case-insensitive).

  Args:
    name: Preset name.

  Returns:
    The preset's ``AugmentConfig``.
  """
  try:
    return _PRESETS[name.lower()]
  except KeyError:
    raise ValueError(f'unknown augmentation preset {name!r}; expected one of {sorted(_PRESETS)}')


# --------------------------------------------------------------------------------------- helpers


def _per_image(fn: Callable, key: jax.Array, images: jax.Array, num_uniforms: int) -> jax.Array:
  """Maps ``fn(u_i, image_i)`` over the batch, where ``u_i`` are ``num_uniforms`` U[0, 1) draws.

  Every image gets its own key (``split``), and all of an image's randomness comes from one
  ``uniform`` call on that key. Deriving crop sizes, offsets, factors and permutations from these
  uniforms, rather than calling ``randint``/``permutation``/``split`` per stage, keeps the jitted
  graph to a single PRNG instantiation, which dominates compile time on CPU.
  """
  keys = jax.random.split(key, images.shape[0])
  uniforms = jax.vmap(lambda k: jax.random.uniform(k, (num_uniforms,)))(keys)
  return jax.vmap(fn)(uniforms, images)


def _check_channels(images: jax.Array) -> int:
  channels = images.shape[-1]
  if channels not in (1, 3):
    raise ValueError(f'expected 1 or 3 channels (NHWC), got shape {images.shape}')
  return channels


def _per_image_factors(factors, images: jax.Array) -> jax.Array:
  """Broadcasts a scalar or ``[N]`` array of factors to ``[N]`` in the images' dtype."""
  return jnp.broadcast_to(jnp.asarray(factors, images.dtype), images.shape[:1])


def _luma(image: jax.Array) -> jax.Array:
  """Grayscale value of an RGB array ``[..., 3]`` -> ``[...]``."""
  return image[..., 0] * _LUMA[0] + image[..., 1] * _LUMA[1] + image[..., 2] * _LUMA[2]


def _blend(image: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
  """``factor * image + (1 - factor) * other``, clipped to ``[0, 1]`` as torchvision does."""
  return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


# ------------------------------------------------------------------------------------ colour ops


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
  """Converts RGB in ``[0, 1]`` to HSV with all three components in ``[0, 1]``.

  Follows the hexcone model (as Python's ``colorsys``): grays get hue 0 and saturation 0, and hue
  is measured in full turns.

  Args:
    rgb: Array ``[..., 3]``.

  Returns:
    Array ``[..., 3]`` of (hue, saturation, value).
  """
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maxc = jnp.maximum(jnp.maximum(r, g), b)
  minc = jnp.minimum(jnp.minimum(r, g), b)
  delta = maxc - minc
  # Safe divisors keep the unused branches of ``where`` finite (no NaNs leak into gradients).
  safe_max = jnp.where(maxc > 0, maxc, 1.0)
  safe_delta = jnp.where(delta > 0, delta, 1.0)
  sat = jnp.where(maxc > 0, delta / safe_max, 0.0)
  # Position on the hexagon in sixths of a turn, measured from the dominant primary.
  h_red = (g - b) / safe_delta
  h_green = 2.0 + (b - r) / safe_delta
  h_blue = 4.0 + (r - g) / safe_delta
  hue6 = jnp.where(maxc == r, h_red, jnp.where(maxc == g, h_green, h_blue))
  hue = jnp.where(delta > 0, jnp.mod(hue6 / 6.0, 1.0), 0.0)
  return jnp.stack([hue, sat, maxc], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  """Inverse of :func:`rgb_to_hsv`.

  Uses the branch-free form ``c_n = v - v s clip(min(k, 4 - k), 0, 1)`` with
  ``k = (n + 6 h) mod 6`` and ``n = 5, 3, 1`` for R, G, B, which equals the piecewise-linear
  hexcone definition.

  Args:
    hsv: Array ``[..., 3]`` of (hue in turns, saturation, value).

  Returns:
    Array ``[..., 3]`` of RGB.
  """
  hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  n = jnp.asarray([5.0, 3.0, 1.0], hsv.dtype)
  k = jnp.mod(n + 6.0 * hue[..., None], 6.0)
  ramp = jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
  return val[..., None] - (val * sat)[..., None] * ramp


def _brightness_one(image: jax.Array, factor: jax.Array) -> jax.Array:
  return _blend(image, jnp.zeros_like(image), factor)


def _contrast_one(image: jax.Array, factor: jax.Array) -> jax.Array:
  # The blend target is one scalar per image: the mean of its grayscale version.
  gray = _luma(image) if image.shape[-1] == 3 else image[..., 0]
  return _blend(image, jnp.mean(gray), factor)


def _saturation_one(image: jax.Array, factor: jax.Array) -> jax.Array:
  if image.shape[-1] == 1:
    return image
  return _blend(image, _luma(image)[..., None], factor)


def _hue_one(image: jax.Array, shift: jax.Array) -> jax.Array:
  if image.shape[-1] == 1:
    return image
  hsv = rgb_to_hsv(image)
  hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + shift, 1.0))
  # HSV -> RGB stays in [0, 1] mathematically; the clip only absorbs rounding.
  return jnp.clip(hsv_to_rgb(hsv), 0.0, 1.0)


def _grayscale_one(image: jax.Array) -> jax.Array:
  if image.shape[-1] == 1:
    return image
  return jnp.broadcast_to(_luma(image)[..., None], image.shape)


def adjust_brightness(images: jax.Array, factors) -> jax.Array:
  """Multiplies each image by its factor and clips to ``[0, 1]``.

  Args:
    images: ``[N, H, W, C]`` in ``[0, 1]``.
    factors: Scalar or ``[N]`` non-negative factors.

  Returns:
    ``[N, H, W, C]`` adjusted images.
  """
  _check_channels(images)
  return jax.vmap(_brightness_one)(images, _per_image_factors(factors, images))


def adjust_contrast(images: jax.Array, factors) -> jax.Array:
  """Blends each image with the scalar mean of its grayscale version, then clips.

  Args:
    images: ``[N, H, W, C]`` in ``[0, 1]``.
    factors: Scalar or ``[N]`` non-negative factors (0 gives a flat gray image, 1 the identity).

  Returns:
    ``[N, H, W, C]`` adjusted images.
  """
  _check_channels(images)
  return jax.vmap(_contrast_one)(images, _per_image_factors(factors, images))


def adjust_saturation(images: jax.Array, factors) -> jax.Array:
  """Blends each image with its grayscale version, then clips (no-op for 1 channel).

  Args:
    images: ``[N, H, W, C]`` in ``[0, 1]``.
    factors: Scalar or ``[N]`` non-negative factors (0 gives grayscale, 1 the identity).

  Returns:
    ``[N, H, W, C]`` adjusted images.
  """
  _check_channels(images)
  return jax.vmap(_saturation_one)(images, _per_image_factors(factors, images))


def adjust_hue(images: jax.Array, shifts) -> jax.Array:
  """Rotates each image's hue by its shift (in full turns) in HSV space (no-op for 1 channel).

  Args:
    images: ``[N, H, W, C]`` in ``[0, 1]``.
    shifts: Scalar or ``[N]`` hue shifts in turns (torchvision's ``hue_factor``).

  Returns:
    ``[N, H, W, C]`` adjusted images.
  """
  _check_channels(images)
  return jax.vmap(_hue_one)(images, _per_image_factors(shifts, images))


def grayscale(images: jax.Array) -> jax.Array:
  """Converts to grayscale with ITU-R 601 weights, keeping the channel count.

  Args:
    images: ``[N, H, W, C]`` with ``C`` in {1, 3}.

  Returns:
    ``[N, H, W, C]`` with all channels equal to ``0.299 R + 0.587 G + 0.114 B``.
  """
  _check_channels(images)
  return jax.vmap(_grayscale_one)(images)


# ---------------------------------------------------------------------------------- random ops
#
# Each single-image op takes a vector ``u`` of U[0, 1) draws instead of a key (see
# ``_per_image``); ``_NUM_*`` is how many it consumes.

_NUM_CROP = 4  # area, log-ratio, top, left
_NUM_FLIP = 1
_NUM_JITTER = 9  # apply, 4 factors, 4 order keys
_NUM_GRAY = 1


def _uniform_in(u: jax.Array, low: float, high: float) -> jax.Array:
  """Maps ``u ~ U[0, 1)`` to ``U[low, high)``; exactly ``low`` when ``low == high``."""
  return low + u * (high - low)


def _bilinear_taps(start: jax.Array, size: jax.Array, out: int):
  """Source indices and weights for resizing ``size`` pixels starting at ``start`` to ``out``.

  Half-pixel centres: output pixel ``d`` samples the crop at ``(d + 0.5) * size / out - 0.5``,
  clamped to the crop so edge pixels replicate rather than reading outside it.

  Returns:
    ``(i0, i1, frac)``, each ``[out]``; the sample is ``(1 - frac) x[i0] + frac x[i1]``.
  """
  dst = jnp.arange(out, dtype=jnp.float32)
  size_f = size.astype(jnp.float32)
  src = jnp.clip((dst + 0.5) * (size_f / out) - 0.5, 0.0, size_f - 1.0)
  lower = jnp.floor(src)
  frac = src - lower
  i0 = lower.astype(jnp.int32)
  i1 = jnp.minimum(i0 + 1, size - 1)
  return start + i0, start + i1, frac


def _random_offset(u: jax.Array, slack: jax.Array) -> jax.Array:
  """Uniform integer in ``[0, slack]`` from ``u ~ U[0, 1)``."""
  return jnp.minimum(jnp.floor(u * (slack + 1).astype(u.dtype)).astype(jnp.int32), slack)


def _crop_one(u: jax.Array, image: jax.Array, scale, ratio) -> jax.Array:
  """RandomResizedCrop of one ``[H, W, C]`` image back to ``[H, W, C]``."""
  height, width = image.shape[0], image.shape[1]
  area = (height * width) * _uniform_in(u[0], scale[0], scale[1])
  aspect = jnp.exp(_uniform_in(u[1], math.log(ratio[0]), math.log(ratio[1])))
  # One draw, clipped to the image, instead of torchvision's 10 retries + central fallback.
  # jnp.round rounds half to even, like Python's round() used by torchvision.
  crop_w = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, width).astype(jnp.int32)
  crop_h = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, height).astype(jnp.int32)
  top = _random_offset(u[2], height - crop_h)
  left = _random_offset(u[3], width - crop_w)
  r0, r1, fy = _bilinear_taps(top, crop_h, height)
  c0, c1, fx = _bilinear_taps(left, crop_w, width)
  fy = fy.astype(image.dtype)[:, None, None]
  fx = fx.astype(image.dtype)[None, :, None]
  # Separable bilinear: rows first, then columns. With crop == image every frac is 0, so the
  # result is bit-exactly the input.
  rows = (1.0 - fy) * image[r0] + fy * image[r1]
  out = (1.0 - fx) * rows[:, c0] + fx * rows[:, c1]
  return jnp.clip(out, 0.0, 1.0)


def random_resized_crop(
  key: jax.Array, images: jax.Array, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> jax.Array:
  """Crops a random box from each image and resizes it back to the full size (bilinear).

  Per image: area fraction uniform in ``scale``, aspect ratio ``w / h`` log-uniform in ``ratio``,
  ``w = round(sqrt(area * ratio))`` and ``h = round(sqrt(area / ratio))`` clipped to the image
  (a single draw, see the module docstring), and a uniformly random integer offset.

  Args:
    key: PRNG key.
    images: ``[N, H, W, C]`` in ``[0, 1]``.
    scale: Static ``(lo, hi)`` area-fraction range.
    ratio: Static ``(lo, hi)`` aspect-ratio range.

  Returns:
    ``[N, H, W, C]`` cropped and resized images.
  """
  fn = functools.partial(_crop_one, scale=tuple(scale), ratio=tuple(ratio))
  return _per_image(fn, key, images, _NUM_CROP)


def _flip_one(u: jax.Array, image: jax.Array, p: float) -> jax.Array:
  return jnp.where(u[0] < p, image[:, ::-1], image)


def random_horizontal_flip(key: jax.Array, images: jax.Array, p: float = 0.5) -> jax.Array:
  """Mirrors each image left-right with probability ``p``.

  Args:
    key: PRNG key.
    images: ``[N, H, W, C]``.
    p: Flip probability.

  Returns:
    ``[N, H, W, C]`` images, each either unchanged or mirrored.
  """
  return _per_image(functools.partial(_flip_one, p=p), key, images, _NUM_FLIP)


def _jitter_one(
  u: jax.Array,
  image: jax.Array,
  brightness: float,
  contrast: float,
  saturation: float,
  hue: float,
  p: float,
) -> jax.Array:
  """ColorJitter (applied with probability ``p``) of one ``[H, W, C]`` image."""
  rgb = image.shape[-1] == 3
  ops = []
  # Disabled ops are dropped statically: they would be identities and only cost compute.
  for strength, u_i, op in (
    (brightness, u[1], _brightness_one),
    (contrast, u[2], _contrast_one),
    (saturation, u[3], _saturation_one if rgb else None),
  ):
    if strength > 0 and op is not None:
      factor = _uniform_in(u_i, max(0.0, 1.0 - strength), 1.0 + strength)
      ops.append(functools.partial(op, factor=factor.astype(image.dtype)))
  if hue > 0 and rgb:
    shift = _uniform_in(u[4], -hue, hue)
    ops.append(functools.partial(_hue_one, shift=shift.astype(image.dtype)))
  if not ops or p <= 0.0:
    return image

  if len(ops) == 1:
    out = ops[0](image)
  else:
    # torchvision draws a fresh permutation of the ops for every call. Sorting i.i.d. uniforms
    # gives a uniformly random permutation; step ``i`` runs op ``order[i]``. The loop keeps one
    # copy of the (vmapped, hence select-of-all-branches) switch in the graph instead of one per
    # step, which keeps compile time down.
    order = jnp.argsort(u[5 : 5 + len(ops)])
    out = jax.lax.fori_loop(0, len(ops), lambda step, x: jax.lax.switch(order[step], ops, x), image)
  if p >= 1.0:
    return out
  return jnp.where(u[0] < p, out, image)


def color_jitter(
  key: jax.Array,
  images: jax.Array,
  brightness: float = 0.0,
  contrast: float = 0.0,
  saturation: float = 0.0,
  hue: float = 0.0,
  p: float = 1.0,
) -> jax.Array:
  """torchvision ``RandomApply([ColorJitter(b, c, s, h)], p)`` with per-image parameters.

  Each image draws brightness/contrast/saturation factors uniform in ``[max(0, 1 - s), 1 + s]``
  and a hue shift uniform in ``[-h, h]``, and applies the enabled ops in a random order, clipping
  to ``[0, 1]`` after each. The strengths and ``p`` are static Python floats.

  Args:
    key: PRNG key.
    images: ``[N, H, W, C]`` in ``[0, 1]``, ``C`` in {1, 3} (saturation and hue are no-ops for 1).
    brightness: Brightness strength.
    contrast: Contrast strength.
    saturation: Saturation strength.
    hue: Hue strength in ``[0, 0.5]``.
    p: Probability of jittering an image at all.

  Returns:
    ``[N, H, W, C]`` jittered images.
  """
  _check_channels(images)
  if not 0.0 <= hue <= 0.5:
    raise ValueError(f'hue must be in [0, 0.5], got {hue}')
  fn = functools.partial(
    _jitter_one, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, p=p
  )
  return _per_image(fn, key, images, _NUM_JITTER)


def _random_grayscale_one(u: jax.Array, image: jax.Array, p: float) -> jax.Array:
  if p <= 0.0 or image.shape[-1] == 1:
    return image
  return jnp.where(u[0] < p, _grayscale_one(image), image)


def random_grayscale(key: jax.Array, images: jax.Array, p: float) -> jax.Array:
  """Converts each image to (channel-preserving) grayscale with probability ``p``.

  Args:
    key: PRNG key.
    images: ``[N, H, W, C]`` in ``[0, 1]``, ``C`` in {1, 3} (a no-op for 1).
    p: Static probability.

  Returns:
    ``[N, H, W, C]`` images.
  """
  _check_channels(images)
  return _per_image(functools.partial(_random_grayscale_one, p=p), key, images, _NUM_GRAY)


# ------------------------------------------------------------------------------------ pipeline


def _augment_one(u: jax.Array, image: jax.Array, config: AugmentConfig) -> jax.Array:
  """The full pipeline for one ``[H, W, C]`` image; each stage reads its own slice of ``u``."""
  u_crop, u_flip, u_jitter, u_gray = jnp.split(
    u, [_NUM_CROP, _NUM_CROP + _NUM_FLIP, _NUM_CROP + _NUM_FLIP + _NUM_JITTER]
  )
  if not (config.crop_scale == (1.0, 1.0) and config.crop_ratio == (1.0, 1.0)):
    image = _crop_one(u_crop, image, config.crop_scale, config.crop_ratio)
  if config.flip:
    image = _flip_one(u_flip, image, 0.5)
  image = _jitter_one(
    u_jitter,
    image,
    config.brightness,
    config.contrast,
    config.saturation,
    config.hue,
    config.jitter_p,
  )
  return _random_grayscale_one(u_gray, image, config.grayscale_p)


def augment(key: jax.Array, images: jax.Array, config: AugmentConfig) -> jax.Array:
  """Applies crop -> flip -> colour jitter -> grayscale, with independent draws per image.

  Args:
    key: PRNG key.
    images: ``[N, H, W, C]`` float images in ``[0, 1]``, ``C`` in {1, 3}.
    config: Static ``AugmentConfig``.

  Returns:
    ``[N, H, W, C]`` augmented images.
  """
  _check_channels(images)
  num = _NUM_CROP + _NUM_FLIP + _NUM_JITTER + _NUM_GRAY
  return _per_image(functools.partial(_augment_one, config=config), key, images, num)


def two_views(key: jax.Array, images: jax.Array, config: AugmentConfig) -> jax.Array:
  """Two independent augmentations of a batch, stacked for the contrastive loss.

  Both views are drawn in one ``augment`` call over the doubled batch, so the PRNG is
  instantiated once.

  Args:
    key: PRNG key.
    images: ``[N, H, W, C]`` in ``[0, 1]``.
    config: Static ``AugmentConfig``.

  Returns:
    ``[2N, H, W, C]``: the first view of all ``N`` images, then the second view in the same order,
    so the positive of row ``i`` is row ``i + N`` (mod ``2N``).
  """
  return augment(key, jnp.concatenate([images, images], axis=0), config)
