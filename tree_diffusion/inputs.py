"""Checks of what the public API is given, made where a call enters the library.

Every entry point that takes images, counts, keys or sizes checks them here first, so that a bad
call is one ``TypeError`` (the wrong kind of value) or ``ValueError`` (the right kind, a wrong
shape, range or size) whose message names the form expected and the form given, raised before
anything is allocated or compiled. What the library takes:

* **Model images** (TreeVAE, the diffusion samplers): floating-point arrays ``[B, H, W, C]`` (NHWC,
  a batch axis first) with the model's ``H = W = image_size`` and ``C = channels``, values in
  ``[0, 1]``. Integer images (``uint8`` 0..255, what :func:`tree_diffusion.data.load_arrays`
  returns) are refused, not converted: :func:`to_unit_range` converts them explicitly.
* **Inception (FID) images**: ``uint8`` ``[N, H, W, 1 or 3]`` in 0..255, as the reference FID.
* **Counts** (``num``, batch sizes, sample counts): Python or NumPy integers ``>= 1``.
* **Keys**: JAX PRNG keys, ``jax.random.key(seed)`` or the legacy ``jax.random.PRNGKey(seed)``.

Inside ``jit`` the images are tracers: their shape and dtype are checked when the function is
traced, their values only when the call is eager (a concrete array).
"""

from __future__ import annotations

import numbers
import os
from typing import Any

import jax
import numpy as np

# Values this far outside [0, 1] are still accepted (float32 rounding of [0, 1] data, resampling).
_RANGE_SLACK = 1e-3


def _kind_of(x: Any) -> str:
  if isinstance(x, (np.ndarray, jax.Array)):
    return f"{x.dtype} array of shape {tuple(x.shape)}"
  return type(x).__name__


def is_concrete(x: Any) -> bool:
  """Whether ``x``'s values can be read now (not a tracer inside ``jit`` or ``grad``)."""
  if isinstance(x, jax.core.Tracer):
    return False
  if isinstance(x, jax.Array):
    return x.is_fully_addressable
  return True


def count(n: Any, name: str, *, minimum: int = 1) -> int:
  """``n`` as an ``int``, checked to be an integer ``>= minimum``.

  Raises:
    TypeError: ``n`` is not an integer (a float, a string, ``None``, a bool).
    ValueError: ``n < minimum``.
  """
  if isinstance(n, bool) or not isinstance(n, numbers.Integral):
    raise TypeError(f"{name} must be an integer >= {minimum}; got {_kind_of(n)} {n!r}")
  if n < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}; got {n}")
  return int(n)


def prng_key(key: Any, name: str = "key") -> None:
  """Checks that ``key`` is one JAX PRNG key (typed, or a legacy ``uint32[2]``).

  Raises:
    TypeError: an int seed, a batch of keys, or any other array.
  """
  dtype = getattr(key, "dtype", None)
  shape = tuple(getattr(key, "shape", ()))
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
    return
  if dtype == np.uint32 and shape == (2,):
    return
  raise TypeError(
    f"{name} must be one JAX PRNG key (jax.random.key(0) or "
    f"jax.random.PRNGKey(0)); got {_kind_of(key)}"
  )


def images(
  x: Any, image_shape: tuple[int, int, int], name: str = "images", *, batch_axis: str = "B"
) -> None:
  """Checks model images: floats ``[B, H, W, C]`` with ``(H, W, C) == image_shape``, ``B >= 1``,
  values in ``[0, 1]`` (when ``x`` is concrete).

  Raises:
    TypeError: not an array, or integer/bool images (with the conversion to use).
    ValueError: another rank, layout (NCHW), size or number of channels; an empty batch; values
      outside [0, 1], NaN or infinite values.
  """
  h, w, c = image_shape
  want = f"floats [{batch_axis}, {h}, {w}, {c}] in [0, 1]"
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(
      f"{name} must be an array of {want}; got {type(x).__name__} (convert it with np.asarray)"
    )
  shape = tuple(x.shape)
  if len(shape) != 4:
    hint = ""
    if shape == (h, w, c):
      hint = f": add a batch axis ({name}[None])"
    elif len(shape) == 3 and c == 1 and shape[1:] == (h, w):
      hint = f": add a channel axis ({name}[..., None])"
    raise ValueError(f"{name} must be {want}; got shape {shape}{hint}")
  b = shape[0]
  if shape[1:] != (h, w, c):
    if shape[1:] == (c, h, w):
      hint = f": that is NCHW; transpose it with {name}.transpose(0, 2, 3, 1)"
    elif shape[1:3] == (h, w):
      hint = (
        f": {shape[3]} channels, the model takes {c} (it was trained on "
        f"{'grey' if c == 1 else 'colour'} images)"
      )
    else:
      hint = (
        f": {shape[1]}x{shape[2]} images, the model takes {h}x{w} (resize them, e.g. "
        f"with PIL, as its training data was)"
      )
    raise ValueError(f"{name} must be {want}; got shape {shape}{hint}")
  if b == 0:
    raise ValueError(f"{name} is an empty batch (shape {shape}); pass at least one image")
  dtype = np.dtype(x.dtype)
  if dtype.kind in "biu":
    raise TypeError(
      f"{name} must be {want}; got {dtype} images (convert them with "
      f"tree_diffusion.inputs.to_unit_range({name}), i.e. / 255 for uint8)"
    )
  if dtype.kind != "f" and dtype != jax.numpy.bfloat16:
    raise TypeError(f"{name} must be {want}; got {dtype} images")
  if not is_concrete(x):
    return
  with jax.ensure_compile_time_eval():  # a concrete array closed over by a traced function
    lo, hi = float(jax.numpy.min(x)), float(jax.numpy.max(x))
  if not (np.isfinite(lo) and np.isfinite(hi)):
    raise ValueError(f"{name} hold NaN or infinite values; the model takes {want}")
  if lo < -_RANGE_SLACK or hi > 1.0 + _RANGE_SLACK:
    hint = (
      " (0..255 images: divide by 255, or use tree_diffusion.inputs.to_unit_range)"
      if hi > 2.0
      else " (images in [-1, 1]: map them with (x + 1) / 2)"
      if lo < 0
      else ""
    )
    raise ValueError(f"{name} must be {want}; got values in [{lo:g}, {hi:g}]{hint}")


def to_unit_range(x: Any) -> np.ndarray:
  """Integer images (``uint8`` 0..255, ``uint16`` 0..65535) as float32 in [0, 1], exactly
  ``x / max`` as the training data is; float images are returned as float32 unchanged."""
  arr = np.asarray(x)
  if arr.dtype.kind == "u":
    return arr.astype(np.float32) / np.float32(np.iinfo(arr.dtype).max)
  if arr.dtype.kind == "f":
    return arr.astype(np.float32)
  raise TypeError(f"to_unit_range takes unsigned-integer or float images; got {arr.dtype}")


def memory_limit() -> int:
  """Bytes one array may take: the first device's memory where JAX reports it, else the host's
  physical memory."""
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (backends without memory statistics)
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fits_memory(nbytes: int, what: str, fix: str) -> None:
  """Refuses, before allocating it, an output of ``nbytes`` that cannot fit in memory.

  Raises:
    ValueError: naming ``what`` would be allocated, its size, the memory there is, and ``fix``.
  """
  limit = memory_limit()
  if nbytes > limit:
    raise ValueError(
      f"{what} would take {_bytes(nbytes)}, more than the {_bytes(limit)} of memory here; {fix}"
    )


def _bytes(n: float) -> str:
  """``n`` bytes in decimal units: ``512 B``, ``6.3 PB``."""
  unit = "B"
  for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
    if n < 1000 or unit == "PB":
      break
    n /= 1000
  return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
