"""Tests for tree_diffusion.augment against independent NumPy float64 computations."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tree_diffusion import augment


# ------------------------------------------------------------------------------------- helpers

_crop = jax.jit(augment.random_resized_crop, static_argnames=('scale', 'ratio'))
_flip = jax.jit(augment.random_horizontal_flip, static_argnames=('p',))
_jitter = jax.jit(
  augment.color_jitter, static_argnames=('brightness', 'contrast', 'saturation', 'hue', 'p')
)
_gray = jax.jit(augment.random_grayscale, static_argnames=('p',))
_augment = jax.jit(augment.augment, static_argnames=('config',))
_two_views = jax.jit(augment.two_views, static_argnames=('config',))


def _images(seed, shape=(4, 8, 8, 3)):
  return np.random.default_rng(seed).uniform(0.0, 1.0, size=shape).astype(np.float32)


def _np_luma(x):
  x = np.asarray(x, np.float64)
  return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def _np_resize_axis(x, out, axis):
  """Bilinear resize along one axis, half-pixel centres, edge clamping (float64)."""
  size = x.shape[axis]
  src = np.clip((np.arange(out) + 0.5) * size / out - 0.5, 0.0, size - 1)
  i0 = np.floor(src).astype(int)
  i1 = np.minimum(i0 + 1, size - 1)
  frac = src - i0
  shape = [1] * x.ndim
  shape[axis] = out
  frac = frac.reshape(shape)
  return (1 - frac) * np.take(x, i0, axis=axis) + frac * np.take(x, i1, axis=axis)


# ---------------------------------------------------------------------------------------- crop


def test_crop_identity_when_full_scale_and_unit_ratio():
  x = _images(0, (4, 16, 16, 3))
  y = _crop(jax.random.key(1), jnp.asarray(x), scale=(1.0, 1.0), ratio=(1.0, 1.0))
  assert y.shape == x.shape
  np.testing.assert_allclose(np.asarray(y), x, atol=1e-5, rtol=0)


def test_crop_changes_images_and_stays_in_range():
  x = _images(1)
  y = np.asarray(_crop(jax.random.key(2), jnp.asarray(x), scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)))
  assert y.shape == x.shape
  assert y.dtype == np.float32
  assert np.all(y >= 0.0) and np.all(y <= 1.0)
  # Full-scale crops are possible but not for all four images at this seed and scale range.
  per_image_diff = np.abs(y - x).reshape(len(x), -1).max(axis=1)
  assert np.any(per_image_diff > 1e-3)


def test_crop_matches_numpy_bilinear_of_some_quarter_crop():
  # scale = 1/4 and ratio = 1 on 8x8 fixes the crop to 4x4; the offset is random, so each
  # output must equal the float64 bilinear upsampling of one of the 25 possible 4x4 crops.
  x = _images(3, (16, 8, 8, 3))
  y = np.asarray(_crop(jax.random.key(4), jnp.asarray(x), scale=(0.25, 0.25), ratio=(1.0, 1.0)))
  offsets_seen = set()
  for n in range(len(x)):
    errors = {}
    for top in range(5):
      for left in range(5):
        patch = x[n, top : top + 4, left : left + 4].astype(np.float64)
        ref = _np_resize_axis(_np_resize_axis(patch, 8, 0), 8, 1)
        errors[(top, left)] = np.abs(ref - y[n]).max()
    best = min(errors, key=errors.get)
    assert errors[best] < 1e-5
    offsets_seen.add(best)
  # Both offsets must vary (a bug that ignores one would always pick the same row or column).
  assert len({top for top, _ in offsets_seen}) > 1
  assert len({left for _, left in offsets_seen}) > 1


# ---------------------------------------------------------------------------------------- flip


def test_flip_is_identity_or_mirror_and_both_occur():
  x = _images(5, (64, 8, 8, 3))
  y = np.asarray(_flip(jax.random.key(6), jnp.asarray(x), p=0.5))
  same = np.all(y == x, axis=(1, 2, 3))
  mirrored = np.all(y == x[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored)
  assert np.any(same & ~mirrored) and np.any(mirrored & ~same)


# ------------------------------------------------------------------------------ colour adjusts


def test_adjust_brightness_matches_numpy():
  x = _images(7)
  f = np.array([0.0, 0.6, 1.0, 1.4], np.float32)
  y = np.asarray(jax.jit(augment.adjust_brightness)(jnp.asarray(x), jnp.asarray(f)))
  ref = np.clip(x.astype(np.float64) * f[:, None, None, None], 0, 1)
  np.testing.assert_allclose(y, ref, atol=1e-6, rtol=0)


def test_adjust_contrast_matches_numpy():
  x = _images(8)
  f = np.array([0.0, 0.6, 1.0, 1.4], np.float32)
  y = np.asarray(jax.jit(augment.adjust_contrast)(jnp.asarray(x), jnp.asarray(f)))
  mean = _np_luma(x).mean(axis=(1, 2))[:, None, None, None]
  ff = f.astype(np.float64)[:, None, None, None]
  ref = np.clip(ff * x + (1 - ff) * mean, 0, 1)
  np.testing.assert_allclose(y, ref, atol=1e-6, rtol=0)


def test_adjust_saturation_matches_numpy():
  x = _images(9)
  f = np.array([0.0, 0.6, 1.0, 1.4], np.float32)
  y = np.asarray(jax.jit(augment.adjust_saturation)(jnp.asarray(x), jnp.asarray(f)))
  gray = _np_luma(x)[..., None]
  ff = f.astype(np.float64)[:, None, None, None]
  ref = np.clip(ff * x + (1 - ff) * gray, 0, 1)
  np.testing.assert_allclose(y, ref, atol=1e-6, rtol=0)


def test_single_channel_saturation_hue_grayscale_are_noops_and_contrast_uses_mean():
  x = _images(10, (2, 8, 8, 1))
  xj = jnp.asarray(x)
  np.testing.assert_array_equal(np.asarray(augment.adjust_saturation(xj, 0.3)), x)
  np.testing.assert_array_equal(np.asarray(augment.adjust_hue(xj, 0.3)), x)
  np.testing.assert_array_equal(np.asarray(augment.grayscale(xj)), x)
  y = np.asarray(augment.adjust_contrast(xj, 0.5))
  mean = x.astype(np.float64).mean(axis=(1, 2, 3))[:, None, None, None]
  np.testing.assert_allclose(y, np.clip(0.5 * x + 0.5 * mean, 0, 1), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------- hue


def test_rgb_hsv_round_trip():
  rgb = np.random.default_rng(11).uniform(size=(4096, 3)).astype(np.float32)
  # Include grays, black, white and pure primaries/secondaries (the branch edges).
  edges = np.array(
    [
      [0, 0, 0],
      [1, 1, 1],
      [0.5, 0.5, 0.5],
      [1, 0, 0],
      [0, 1, 0],
      [0, 0, 1],
      [1, 1, 0],
      [0, 1, 1],
      [1, 0, 1],
      [0.3, 0.3, 0.7],
    ],
    np.float32,
  )
  rgb = np.concatenate([rgb, edges])
  back = jax.jit(lambda c: augment.hsv_to_rgb(augment.rgb_to_hsv(c)))(jnp.asarray(rgb))
  np.testing.assert_allclose(np.asarray(back), rgb, atol=1e-5, rtol=0)


def test_rgb_to_hsv_matches_colorsys():
  rgb = np.random.default_rng(12).uniform(size=(512, 3))
  hsv = np.asarray(jax.jit(augment.rgb_to_hsv)(jnp.asarray(rgb, jnp.float32)), np.float64)
  ref = np.array([colorsys.rgb_to_hsv(*c) for c in rgb])
  # Hue is circular: compare on the circle.
  dh = np.abs(hsv[:, 0] - ref[:, 0])
  assert np.all(np.minimum(dh, 1 - dh) < 1e-5)
  np.testing.assert_allclose(hsv[:, 1:], ref[:, 1:], atol=1e-5, rtol=0)


def test_hue_zero_shift_is_identity_and_half_turn_twice_is_identity():
  x = _images(13)
  hue = jax.jit(augment.adjust_hue)
  xj = jnp.asarray(x)
  np.testing.assert_allclose(np.asarray(hue(xj, jnp.zeros(4))), x, atol=1e-5, rtol=0)
  half = jnp.full((4,), 0.5)
  twice = np.asarray(hue(hue(xj, half), half))
  np.testing.assert_allclose(twice, x, atol=1e-5, rtol=0)
  # A half turn on its own must actually change the colours.
  assert np.abs(np.asarray(hue(xj, half)) - x).max() > 0.1


def test_adjust_hue_matches_colorsys():
  x = _images(14, (3, 4, 4, 3))
  shifts = np.array([0.1, -0.3, 0.45], np.float32)
  y = np.asarray(jax.jit(augment.adjust_hue)(jnp.asarray(x), jnp.asarray(shifts)))
  ref = np.empty(x.shape, np.float64)
  for n in range(x.shape[0]):
    for i in range(x.shape[1]):
      for j in range(x.shape[2]):
        h, s, v = colorsys.rgb_to_hsv(*x[n, i, j].astype(np.float64))
        ref[n, i, j] = colorsys.hsv_to_rgb((h + float(shifts[n])) % 1.0, s, v)
  np.testing.assert_allclose(y, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- grayscale


def test_grayscale_channels_equal_luma():
  x = _images(15)
  y = np.asarray(_gray(jax.random.key(0), jnp.asarray(x), p=1.0))
  assert y.shape == x.shape
  np.testing.assert_array_equal(y[..., 0], y[..., 1])
  np.testing.assert_array_equal(y[..., 0], y[..., 2])
  np.testing.assert_allclose(y[..., 0], _np_luma(x), atol=1e-6, rtol=0)


def test_random_grayscale_mixes_with_half_probability():
  x = _images(16, (64, 4, 4, 3))
  y = np.asarray(_gray(jax.random.key(1), jnp.asarray(x), p=0.5))
  unchanged = np.all(y == x, axis=(1, 2, 3))
  gray = np.all(np.abs(y - _np_luma(x)[..., None]) < 1e-6, axis=(1, 2, 3))
  assert np.all(unchanged | gray)
  assert np.any(unchanged) and np.any(gray)


# ------------------------------------------------------------------------------------- jitter


def test_color_jitter_factors_within_ranges():
  # Brightness alone: each output is the input times one factor in [0.6, 1.4] (clip aside).
  x = _images(17, (16, 8, 8, 3)) * 0.5
  y = np.asarray(_jitter(jax.random.key(3), jnp.asarray(x), brightness=0.4))
  ratio = y / x
  per_image = ratio.reshape(16, -1)
  first = np.broadcast_to(per_image[:, :1], per_image.shape)
  np.testing.assert_allclose(per_image, first, rtol=1e-5)
  assert np.all(per_image >= 0.6 - 1e-6) and np.all(per_image <= 1.4 + 1e-6)
  assert per_image[:, 0].std() > 0.05  # factors differ between images


def test_color_jitter_full_in_range_and_p_zero_is_identity():
  x = jnp.asarray(_images(18))
  y = np.asarray(
    _jitter(jax.random.key(4), x, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
  )
  assert np.all(y >= 0) and np.all(y <= 1)
  assert np.abs(y - np.asarray(x)).max() > 1e-3
  z = _jitter(jax.random.key(4), x, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.0)
  np.testing.assert_array_equal(np.asarray(z), np.asarray(x))


def test_color_jitter_order_follows_sorted_order_uniforms():
  # Clipping makes brightness and contrast non-commuting, so the order is observable. This drives
  # the private per-image op with hand-picked uniforms: u[1] -> brightness factor, u[2] ->
  # contrast factor, u[5:7] -> order keys (argsort gives the order).
  x = _images(23, (1, 8, 8, 3))[0].astype(np.float64)
  b, c = 1.4, 0.6
  u_b, u_c = (b - 0.6) / 0.8, (c - 0.6) / 0.8
  jit_one = jax.jit(lambda u, im: augment._jitter_one(u, im, 0.4, 0.4, 0.0, 0.0, 1.0))

  def ref(order):
    y = x
    for op in order:
      if op == 'b':
        y = np.clip(b * y, 0, 1)
      else:
        y = np.clip(c * y + (1 - c) * _np_luma(y).mean(), 0, 1)
    return y

  for keys, order in [((0.1, 0.9), 'bc'), ((0.9, 0.1), 'cb')]:
    u = jnp.asarray([0.0, u_b, u_c, 0.0, 0.0, keys[0], keys[1], 0.0, 0.0], jnp.float32)
    y = np.asarray(jit_one(u, jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(y, ref(order), atol=1e-5, rtol=0)
  assert np.abs(ref('bc') - ref('cb')).max() > 1e-2


# ----------------------------------------------------------------------------------- pipeline


def test_presets_and_config_is_hashable():
  assert augment.get('cifar') == augment.CIFAR
  assert augment.get('CelebA') == augment.CELEBA
  assert augment.get('none') == augment.NONE
  assert len({augment.CIFAR, augment.CELEBA, augment.NONE}) == 3
  with pytest.raises(ValueError):
    augment.get('imagenet')
  with pytest.raises(ValueError):
    augment.AugmentConfig(hue=0.7)


def test_two_views_none_is_identity_layout():
  x = _images(19, (3, 8, 12, 3))  # non-square too: NONE must still be the identity
  y = np.asarray(_two_views(jax.random.key(0), jnp.asarray(x), config=augment.NONE))
  assert y.shape == (6, 8, 12, 3)
  np.testing.assert_array_equal(y[:3], x)
  np.testing.assert_array_equal(y[3:], x)


def test_two_views_cifar_shape_range_and_views_differ():
  x = jnp.asarray(_images(20))
  y = np.asarray(_two_views(jax.random.key(1), x, config=augment.CIFAR))
  assert y.shape == (8, 8, 8, 3)
  assert np.all(y >= 0) and np.all(y <= 1)
  assert np.abs(y[:4] - y[4:]).max() > 1e-3


def test_determinism():
  # Same shape and config as the CIFAR test above, so the compiled function is reused.
  x = jnp.asarray(_images(21))
  a = np.asarray(_two_views(jax.random.key(5), x, config=augment.CIFAR))
  b = np.asarray(_two_views(jax.random.key(5), x, config=augment.CIFAR))
  c = np.asarray(_two_views(jax.random.key(6), x, config=augment.CIFAR))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3
  # Different keys must change (almost) every image, not just one.
  per_image = np.abs(a - c).reshape(len(a), -1).max(axis=1)
  assert np.sum(per_image > 1e-3) >= len(a) - 1


def test_celeba_preset_runs_on_single_channel():
  x = jnp.asarray(_images(22, (4, 8, 8, 1)))
  y = np.asarray(_augment(jax.random.key(7), x, config=augment.CELEBA))
  assert y.shape == x.shape
  assert np.all(y >= 0) and np.all(y <= 1)
