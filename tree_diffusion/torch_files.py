"""Tensors of a ``torch.save`` file or a TorchScript archive, read without torch.

Both the zip format (torch ≥ 1.6 and TorchScript: ``data.pkl`` plus one file per storage) and the
legacy format (a sequence of pickles followed by the raw storages) are read. The unpickler knows
only torch's tensor records and an ``OrderedDict``; any other global in the file is refused, so a
file cannot run code here. A training checkpoint (PyTorch Lightning's ``.ckpt``) also pickles
objects of its own classes (hyper-parameters, callback states): with ``opaque_objects=True`` each
such global becomes an inert placeholder built here, which nothing calls into, and only the
tensors under mappings are read.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import zipfile
from typing import Any, Callable, Mapping

import numpy as np


class TorchFileError(ValueError):
  """A file that is not a torch file, is damaged, or holds something other than tensors."""


_DTYPES = {
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclasses.dataclass
class _Storage:
  dtype: np.dtype
  numel: int
  data: np.ndarray | None = None


@dataclasses.dataclass
class _Tensor:
  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  strides: tuple[int, ...]

  def materialize(self) -> np.ndarray:
    if self.storage.data is None:
      raise TorchFileError("a tensor's storage is missing from the file")
    data = self.storage.data
    if 0 in self.shape:
      return np.empty(self.shape, data.dtype)
    last = self.offset + sum((d - 1) * s for d, s in zip(self.shape, self.strides))
    if self.offset < 0 or min(self.strides, default=0) < 0 or last >= data.size:
      raise TorchFileError(f"a tensor {self.shape} lies outside its storage of {data.size}")
    strides = [s * data.dtype.itemsize for s in self.strides]
    return np.lib.stride_tricks.as_strided(data[self.offset :], self.shape, strides).copy()


class _ScriptObject:
  """Stands for any ``__torch__.*`` class of a TorchScript archive: only its attributes are read."""


class _Opaque:
  """Stands for any other global of a checkpoint read with ``opaque_objects=True``: it accepts
  whatever the pickle hands it and keeps nothing, so no code of the file's classes runs."""

  def __init__(self, *unused_args, **unused_kwargs):
    pass

  def __setstate__(self, unused_state):
    pass

  def __setitem__(self, unused_key, unused_value):  # pickle's SETITEMS on a dict subclass
    pass

  def append(self, unused_value):  # APPENDS on a list subclass
    pass

  def extend(self, unused_values):
    pass


def _rebuild_tensor(storage, offset, shape, strides, *unused) -> _Tensor:
  return _Tensor(storage, int(offset), tuple(shape), tuple(strides))


def _rebuild_parameter(data, *unused):
  return data


class _Unpickler(pickle.Unpickler):
  """Unpickles torch's tensor records into :class:`_Tensor`; any other global is refused."""

  def __init__(self, file, storage: Callable[[tuple], _Storage], opaque_objects: bool = False):
    super().__init__(file)
    self._storage = storage
    self._opaque = opaque_objects

  def find_class(self, module: str, name: str):
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _DTYPES:
      return name
    if module == "torch.jit._pickle" and name.startswith("build_"):  # typed lists of attributes
      return list
    if module == "torch.jit._pickle" and name == "restore_type_tag":
      return lambda value, unused_type: value
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module.startswith("__torch__."):
      return type(name, (_ScriptObject,), {})
    if self._opaque:
      return type(name, (_Opaque,), {})
    raise pickle.UnpicklingError(f"unsupported object {module}.{name} in a torch file")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    return self._storage(pid)


def _storage_dtype(storage_type) -> np.dtype:
  if storage_type not in _DTYPES:
    raise TorchFileError(f"unsupported tensor storage {storage_type!r}")
  return np.dtype(_DTYPES[storage_type])


def _load_zip(path: str, opaque_objects: bool = False) -> Any:
  """``torch.save`` zip and TorchScript archives: ``<dir>/data.pkl`` + ``<dir>/data/<key>``."""
  with zipfile.ZipFile(path) as z:
    pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
      raise TorchFileError(f"{path} is a zip file but not a torch archive (no <dir>/data.pkl)")
    prefix = pkl[0][: -len("data.pkl")]
    order = "little"
    if prefix + "byteorder" in z.namelist():
      order = z.read(prefix + "byteorder").decode().strip()
    storages: dict[str, _Storage] = {}

    def storage(pid):
      _, storage_type, key, _, numel = pid[:5]
      if key not in storages:
        dtype = _storage_dtype(storage_type).newbyteorder("<" if order == "little" else ">")
        data = np.frombuffer(z.read(f"{prefix}data/{key}"), dtype)
        storages[key] = _Storage(dtype, int(numel), data.astype(dtype.newbyteorder("=")))
      return storages[key]

    return _Unpickler(io.BytesIO(z.read(pkl[0])), storage, opaque_objects).load()


def _load_legacy(path: str, opaque_objects: bool = False) -> Any:
  """The pre-1.6 ``torch.save`` format: pickles (magic, version, sys info, object, storage keys)
  followed by each storage as an int64 element count and its raw little-endian bytes."""
  storages: dict[str, _Storage] = {}
  views: list[tuple[str, str, int, int]] = []

  def storage(pid):
    _, storage_type, key, _, numel, view = (pid + (None,))[:6]
    if key not in storages:
      storages[key] = _Storage(_storage_dtype(storage_type), int(numel))
    if view is None:
      return storages[key]
    view_key, offset, size = view
    views.append((view_key, key, int(offset), int(size)))
    storages[view_key] = _Storage(storages[key].dtype, int(size))
    return storages[view_key]

  def plain(f):  # a pickle of plain values only
    return _Unpickler(f, lambda pid: None).load()

  with open(path, "rb") as f:
    try:
      magic = plain(f)
      version = plain(f)
      plain(f)  # sys info
    except Exception as e:  # noqa: BLE001 - any garbage means "not this format"
      raise TorchFileError(f"{path} is neither a zip nor a legacy torch file ({e})") from None
    if magic != _LEGACY_MAGIC or version != 1001:
      raise TorchFileError(f"{path} is not a torch file (magic {magic!r})")
    obj = _Unpickler(f, storage, opaque_objects).load()
    for key in plain(f):
      s = storages[key]
      numel = int(np.frombuffer(f.read(8), "<i8")[0])
      raw = f.read(numel * s.dtype.itemsize)
      if numel != s.numel or len(raw) != numel * s.dtype.itemsize:
        raise TorchFileError(f"{path} is truncated (storage {key})")
      s.data = np.frombuffer(raw, s.dtype.newbyteorder("<")).astype(s.dtype)
  for view_key, root, offset, size in views:
    storages[view_key].data = storages[root].data[offset : offset + size]
  return obj


def _flatten(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
  """Dotted names → arrays of a state dict (possibly nested) or a TorchScript module tree."""
  if isinstance(obj, _Tensor):
    return {prefix[:-1]: obj.materialize()}
  if isinstance(obj, _ScriptObject):
    obj = vars(obj)
  out = {}
  if isinstance(obj, Mapping):
    for k, v in obj.items():
      if isinstance(v, (_Tensor, _ScriptObject, Mapping)):
        out.update(_flatten(v, f"{prefix}{k}."))
  return out


def _load(path: str, opaque_objects: bool) -> Any:
  load = _load_zip if zipfile.is_zipfile(path) else _load_legacy
  try:
    return load(path, opaque_objects)
  except TorchFileError:
    raise
  except Exception as e:  # noqa: BLE001 - a damaged file can fail in many ways
    raise TorchFileError(f"cannot read torch file {path}: {type(e).__name__}: {e}") from None


def read_torch_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """``(tensors, scalars)`` of a training checkpoint (a dict ``torch.save``d by PyTorch
  Lightning, say): every tensor by its dotted name, and the top level's numbers and strings
  (``epoch``, ``global_step``, ...). Objects of other classes are read past (``opaque_objects``)."""
  obj = _load(path, opaque_objects=True)
  if not isinstance(obj, Mapping):
    raise TorchFileError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
  scalars = {
    k: v for k, v in obj.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
  }
  try:
    return _flatten(obj), scalars
  except TorchFileError:
    raise
  except Exception as e:  # noqa: BLE001
    raise TorchFileError(f"cannot read torch file {path}: {type(e).__name__}: {e}") from None


def read_torch_tensors(path: str, opaque_objects: bool = False) -> dict[str, np.ndarray]:
  """Every tensor of a torch file (TorchScript archive or ``torch.save``, zip or legacy) by its
  dotted name, as numpy arrays, without importing torch or running any code from the file.

  ``opaque_objects``: read past objects of other classes (a training checkpoint's
  hyper-parameters, say) instead of refusing the file; their tensors are not read."""
  obj = _load(path, opaque_objects)
  try:
    return _flatten(obj)
  except TorchFileError:
    raise
  except Exception as e:  # noqa: BLE001 - a damaged file can fail in many ways
    raise TorchFileError(f"cannot read torch file {path}: {type(e).__name__}: {e}") from None
