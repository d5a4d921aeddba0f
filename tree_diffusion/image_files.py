"""Reading one image file into pixels: the rules for every PIL mode a folder may hold.

* Images become grey (``channels=1``, PIL's ITU-R 601-2 luma) or RGB (``channels=3``, grey
  replicated). Samples wider than 8 bits are scaled to 0..255, per image, rounding half up:
  16-bit (PIL ``I;16``, e.g. 16-bit PNGs) ``v -> round(v * 255 / 65535)`` (``v / 257``: the high
  byte with rounding); 32-bit ints (``I``) the same when the image's max is <= 65535, else
  ``round(v * 255 / (2**31 - 1))``, negatives 0; floats (``F``) as ``[0, 1]`` when the image's max
  is <= 1, else as ``[0, 255]``, clipped, NaN 0.
* Images with transparency (an alpha channel as in RGBA, LA, PA, or a transparent palette entry or
  colour key) whose alpha is not all 255 are composited over one background for the whole
  dataset (:func:`flatten`), so content drawn only in the alpha channel (ink on a transparent
  background) stays visible: ``out = (c * a + b * (255 - a)) / 255`` rounded half up, where ``b``
  is white (255) unless the alpha-weighted mean grey of the transparent images' colour is light
  (> 127.5), then black (0). One warning per dataset says how many images had transparency and
  which background was used. When resizing, colour premultiplied by alpha and alpha are resized,
  then composited.
* The resize rule: center-crop to a square on the shorter side, then PIL's bilinear filter, which
  is antialiased when downsampling (as torchvision's default ``Resize``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)


class ImageSizeError(ValueError):
  """An image that is not ``size`` x ``size`` where resizing is off."""

  def __init__(self, path: str, width: int, height: int):
    super().__init__(f'{path} is {width}x{height}')
    self.path, self.width, self.height = path, width, height


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
  """The resize rule: center-crop to a square on the shorter side, then antialiased bilinear."""
  width, height = image.size
  if (width, height) == (size, size):
    return image
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  image = image.crop((left, top, left + side, top + side))
  return image.resize((size, size), Image.Resampling.BILINEAR)


def from_pil(image: Image.Image) -> np.ndarray:
  """A PIL image as uint8 HWC."""
  array = np.asarray(image, dtype=np.uint8)
  return array[..., None] if array.ndim == 2 else array


# The PIL modes whose samples are wider than 8 bits (16-bit unsigned, 32-bit signed, 32-bit float)
# and the full scale each is mapped from; see _high_depth_to_grey.
_UINT16_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')
_HIGH_DEPTH_MODES = _UINT16_MODES + ('I', 'F')


def _round_half_up(values: np.ndarray) -> np.ndarray:
  return np.floor(np.clip(values, 0.0, 255.0) + 0.5).astype(np.uint8)


def _high_depth_to_grey(image: Image.Image) -> Image.Image:
  """A 16/32-bit grey image as 8-bit 'L', scaled (``convert('L')`` would clip every value > 255).

  The rule, per image, rounding half up: ``I;16`` ``v -> v * 255 / 65535`` (= v / 257, the high
  byte with rounding); ``I`` the same when the image's max is <= 65535, else
  ``v * 255 / (2**31 - 1)``, negatives 0; ``F`` ``v * 255`` (a [0, 1] image) when the max is <= 1,
  else ``v`` (a [0, 255] image), clipped to 0..255, NaN 0.
  """
  values = np.asarray(image, np.float64)
  if image.mode == 'F':
    values = np.nan_to_num(values, nan=0.0, posinf=np.inf, neginf=0.0)
    full_scale = 1.0 if values.size and values.max() <= 1.0 else 255.0
  elif image.mode == 'I' and values.size and values.max() > 65535:
    full_scale = float(2**31 - 1)
  else:
    full_scale = 65535.0
  return Image.fromarray(_round_half_up(values * 255.0 / full_scale), 'L')


@dataclasses.dataclass(frozen=True)
class Decoded:
  """One decoded image at the configured size.

  Attributes:
    pixels: uint8 [H,W,C], final, when ``alpha`` is None; else float [H,W,C], the colour (0..255)
      premultiplied by alpha (0..255), to be composited by ``_composite``.
    alpha: None for an opaque image; else float [H,W,1] in 0..255.
  """

  pixels: np.ndarray
  alpha: np.ndarray | None = None


def _resize_float(channel: np.ndarray, size: int) -> np.ndarray:
  """The resize rule applied to one float [H,W] channel (PIL mode 'F', the same filter)."""
  return np.asarray(center_crop_resize(Image.fromarray(channel.astype(np.float32), 'F'), size))


def _alpha_split(image: Image.Image, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
  """(colour premultiplied by alpha, alpha) as float [H,W,C] and [H,W,1] for an image with
  transparency that is used (some alpha < 255); None for an opaque one."""
  if not image.has_transparency_data:
    return None
  with_alpha = image.convert('RGBA')  # applies palette transparency and colour keys
  if channels == 1:
    with_alpha = with_alpha.convert('LA')
  array = np.asarray(with_alpha, np.float32)
  alpha = array[..., -1:]
  if alpha.min() == 255.0:
    return None
  return array[..., :-1] * alpha, alpha


def decode(path: str, size: int, channels: int, resize: bool) -> Decoded | None:
  """One image at the configured size and channels, or None (with a warning) if PIL cannot read
  it; an image with used transparency is returned premultiplied (see ``Decoded``)."""
  try:
    with Image.open(path) as image:
      if image.mode in _HIGH_DEPTH_MODES:
        image = _high_depth_to_grey(image)
      split = _alpha_split(image, channels)
      # Grey for one channel, RGB for three; palettes are expanded.
      image = image.convert('L' if channels == 1 else 'RGB')
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    logger.warning('skipping unreadable image %s (%s)', path, e)
    return None
  if image.size != (size, size):
    if not resize:
      raise ImageSizeError(path, *image.size)
    if split is None:
      image = center_crop_resize(image, size)
    else:
      # Premultiplied colour and alpha resize linearly, so compositing afterwards equals
      # compositing first and resizing then (up to rounding), without choosing the background yet.
      split = tuple(
        np.stack([_resize_float(a[..., c], size) for c in range(a.shape[-1])], -1) for a in split
      )
  if split is None:
    return Decoded(from_pil(image))
  return Decoded(*split)


def _background(decoded: Sequence[Decoded]) -> float:
  """The one background of a dataset's transparent images: white (255) unless the alpha-weighted
  mean colour of their content is light (grey > 127.5, PIL's luma for RGB), then black (0)."""
  weight = sum(float(d.alpha.sum()) for d in decoded)
  if weight == 0.0:  # fully transparent images: nothing to contrast with
    return 255.0
  mean = sum(d.pixels.sum(axis=(0, 1)) for d in decoded) / weight
  grey = float(mean[0]) if mean.size == 1 else float(np.dot(mean, [0.299, 0.587, 0.114]))
  return 0.0 if grey > 127.5 else 255.0


def _composite(decoded: Decoded, background: float) -> np.ndarray:
  """``(c * a + b * (255 - a)) / 255``, rounded half up, as uint8 [H,W,C]."""
  return _round_half_up((decoded.pixels + background * (255.0 - decoded.alpha)) / 255.0)


def flatten(decoded: Sequence[Decoded], paths: Sequence[str]) -> list[np.ndarray]:
  """The final uint8 images: transparent ones composited over one background (one warning)."""
  transparent = [i for i, d in enumerate(decoded) if d.alpha is not None]
  if not transparent:
    return [d.pixels for d in decoded]
  background = _background([decoded[i] for i in transparent])
  colour = 'white' if background else 'black'
  logger.warning(
    '%d of %d images have transparency (e.g. %s): composited over %s, the background that '
    'contrasts most with their mean colour; flatten them yourself for another background',
    len(transparent),
    len(decoded),
    paths[transparent[0]],
    colour,
  )
  return [d.pixels if d.alpha is None else _composite(d, background) for d in decoded]
