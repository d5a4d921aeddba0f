"""One path layer for every file the project reads or writes: local paths and ``gs://`` URLs alike.

Paths are :class:`etils.epath.Path` (what Orbax uses), so a run directory on Cloud Storage works
wherever a local one does. Writes are atomic: a local file is written next to its target and
renamed into place (a crash or a full disk leaves the previous file or the new one, never a
truncated one); an object on Cloud Storage is uploaded whole, and the upload only replaces the
previous object once it is complete, which is atomic by itself.

Credentials and the endpoint are gcsfs's: application-default credentials on a Cloud VM,
``GOOGLE_APPLICATION_CREDENTIALS``, or ``STORAGE_EMULATOR_HOST`` for a local emulator.
"""

from __future__ import annotations

import errno
import io
import json
import os
from typing import Any, Callable, Mapping

import numpy as np
from etils import epath

from tree_diffusion import errors

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """Whether ``path`` is a URL (``gs://…``, ``s3://…``), not a local path."""
  return "://" in os.fspath(path)


def check_path(path, name: str = "path") -> None:
  """Raises ``TypeError`` unless ``path`` is a non-empty local path or URL (``str`` or
  ``os.PathLike``)."""
  if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
    raise TypeError(
      f"{name} must be a local path or a gs:// URL (a non-empty str or "
      f"os.PathLike); got {type(path).__name__} {path!r:.60}"
    )


def bucket_of(path: PathLike) -> str | None:
  """``gs://bucket/a/b`` → ``"bucket"``; ``None`` for a local path."""
  text = os.fspath(path)
  if not is_remote(text):
    return None
  return text.split("://", 1)[1].split("/", 1)[0]


def as_path(path: PathLike) -> epath.Path:
  """``path`` as an :class:`epath.Path`; a local one made absolute (Orbax needs that), a URL kept
  as it is (``os.path.abspath`` would turn ``gs://b/r`` into ``<cwd>/gs:/b/r``)."""
  if isinstance(path, epath.Path) and is_remote(path):
    return path
  text = os.fspath(path)
  return epath.Path(text if is_remote(text) else os.path.abspath(text))


def join(root: PathLike, *parts: str) -> str:
  """``root/part/…`` as a string, for local paths and URLs alike."""
  text = os.fspath(root)
  if not parts:
    return text
  if is_remote(text):
    return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])
  return os.path.join(text, *parts)


def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def is_dir(path: PathLike) -> bool:
  return as_path(path).is_dir()


def is_file(path: PathLike) -> bool:
  return as_path(path).is_file()


def makedirs(path: PathLike):
  """Creates the local directory ``path`` and its parents. On Cloud Storage folders are implicit
  (an object's name holds its path): nothing is created, and a missing bucket is an error, never
  created (:func:`check_bucket`)."""
  if is_remote(path):
    check_bucket(path)
    return
  os.makedirs(path, exist_ok=True)


CREDENTIALS_HELP = (
  "credentials come from the VM's service account on Google Cloud, from "
  "GOOGLE_APPLICATION_CREDENTIALS=key.json, or from `gcloud auth "
  "application-default login`"
)


def one_line(e: BaseException) -> str:
  """``e``'s message on one line (client libraries put JSON and tracebacks in theirs)."""
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= 300 else text[:297] + "..."


def check_bucket(path: PathLike):
  """Checks that the bucket of the ``gs://`` URL ``path`` exists and can be reached with the
  credentials at hand (one request); nothing for a local path.

  Raises:
    StorageError: the bucket does not exist, or cannot be listed with these credentials, or the
      server cannot be reached; the message names the bucket and how to provide credentials.
  """
  bucket = bucket_of(path)
  if bucket is None:
    return
  from tree_diffusion.errors import StorageError  # pylint: disable=g-import-not-at-top

  url = os.fspath(path).split("://", 1)[0] + "://" + bucket
  try:
    found = epath.Path(url).exists()
  except Exception as e:  # pylint: disable=broad-except  (auth, HTTP and connection errors)
    raise StorageError(
      f"bucket {bucket} of {os.fspath(path)} cannot be reached ({type(e).__name__}: "
      f"{one_line(e)}); {CREDENTIALS_HELP}"
    ) from None
  if not found:
    raise StorageError(
      f"bucket {bucket} of {os.fspath(path)} does not exist or these credentials cannot see "
      f"it: create it (gcloud storage buckets create gs://{bucket}) or use another; "
      f"{CREDENTIALS_HELP}"
    )


def read_bytes(path: PathLike) -> bytes:
  return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
  return as_path(path).read_text()


def read_json(path: PathLike) -> Any:
  return json.loads(read_text(path))


def write_bytes(path: PathLike, data: bytes):
  """Writes ``data`` to ``path`` atomically, creating its directory.

  Raises:
    DiskFullError: the disk is full (or the quota used up); the previous file is left as it was,
      and the message says so.
  """
  target = as_path(path)
  if is_remote(path):
    target.write_bytes(data)  # one upload: the object appears whole or not at all
    return
  tmp = f"{target}.tmp{os.getpid()}"
  existed = target.exists()
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  except Exception as e:  # pylint: disable=broad-except  (a full disk is said as such)
    full = errors.disk_full(e)
    if full is None:
      raise
    kept = (
      "the previous one is kept as it was"
      if existed
      else "nothing was there before, nothing was lost"
    )
    raise errors.DiskFullError(
      getattr(full, "errno", None) or errno.ENOSPC,
      f"the disk is full: {target} was not written ({kept}); free space on the disk that holds "
      f"{target.parent} and re-run the same command",
      str(target),
    ) from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: PathLike, text: str):
  write_bytes(path, text.encode())


def write_json(path: PathLike, obj: Any, default: Callable[[Any], Any] | None = None):
  """``obj`` as indented JSON, written atomically."""
  write_text(path, json.dumps(obj, indent=1, default=default))


def save_npz(path: PathLike, compressed: bool = True, **arrays: np.ndarray):
  """``np.savez[_compressed]`` of ``arrays``, written atomically."""
  buf = io.BytesIO()
  (np.savez_compressed if compressed else np.savez)(buf, **arrays)
  write_bytes(path, buf.getvalue())


def load_npz(path: PathLike) -> Mapping[str, np.ndarray]:
  """The arrays of an ``.npz`` file (read whole, pickles refused)."""
  with np.load(io.BytesIO(read_bytes(path)), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def save_png(path: PathLike, image):
  """A PIL image, or a uint8 array (``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]``), as PNG."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if not isinstance(image, Image.Image):
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
      raise ValueError(
        f"save_png takes a PIL image or uint8 [H, W], [H, W, 3] or [H, W, 4]; got "
        f"{arr.dtype} {arr.shape} (floats in [0, 1]: np.rint(x * 255)"
        f".astype(np.uint8))"
      )
    image = Image.fromarray(arr)
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  write_bytes(path, buf.getvalue())


def remove(path: PathLike):
  """Removes a file if it exists."""
  p = as_path(path)
  if p.exists():
    p.unlink()


def listdir(path: PathLike) -> list[str]:
  """The names in a directory (local or ``gs://``), sorted."""
  return sorted(p.name for p in as_path(path).iterdir())


def rmtree(path: PathLike):
  """Removes a directory and everything in it, if it exists."""
  p = as_path(path)
  if p.exists():
    p.rmtree()
