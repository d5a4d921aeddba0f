"""The path layer (tree_diffusion/files.py) on a local disk: every output is replaced atomically,
so a write that fails half-way (a full disk) leaves the previous file as it was."""

import errno
import io
import os

import numpy as np
import pytest

from tree_diffusion import files


class _DiskFullAfter(io.FileIO):
  """A file that accepts ``limit`` bytes, then fails as a full disk does."""

  def __init__(self, path, mode, limit):
    super().__init__(path, mode)
    self.left = limit

  def write(self, data):
    if len(data) > self.left:
      super().write(bytes(data[: self.left]))
      self.left = 0
      raise OSError(errno.ENOSPC, "No space left on device")
    self.left -= len(data)
    return super().write(data)


@pytest.mark.parametrize(
  "write",
  [
    lambda p: files.save_npz(p, images=np.full((64, 28, 28, 1), 7, np.uint8)),
    lambda p: files.write_json(p, {"x": list(range(1000))}),
    lambda p: files.save_png(p, np.full((64, 64, 3), 200, np.uint8)),
  ],
)
def test_a_write_that_fails_half_way_leaves_the_previous_file(tmp_path, monkeypatch, write):
  path = tmp_path / "out" / "file"
  path.parent.mkdir()
  path.write_bytes(b"the previous contents")
  monkeypatch.setattr(
    files, "open", lambda p, mode: _DiskFullAfter(p, mode, limit=100), raising=False
  )
  with pytest.raises(OSError) as e:
    write(str(path))
  assert e.value.errno == errno.ENOSPC
  assert path.read_bytes() == b"the previous contents"
  assert os.listdir(path.parent) == ["file"]  # no temporary file left behind
  monkeypatch.undo()
  write(str(path))  # with space: replaced
  assert path.read_bytes() != b"the previous contents"


def test_round_trips_and_local_paths_are_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  files.save_npz("a/s.npz", images=np.arange(6, dtype=np.uint8).reshape(2, 3), compressed=False)
  np.testing.assert_array_equal(files.load_npz("a/s.npz")["images"], [[0, 1, 2], [3, 4, 5]])
  files.write_text("a/t.md", "é\n")
  assert (tmp_path / "a" / "t.md").read_text() == "é\n"
  assert str(files.as_path("a")) == str(tmp_path / "a")
  assert files.join("gs://b/r/", "x", "y.json") == "gs://b/r/x/y.json"
  assert files.join("r", "x") == os.path.join("r", "x")
  assert files.bucket_of("gs://b/r/x") == "b" and files.bucket_of("r/x") is None
  files.remove("a/t.md")
  files.remove("a/t.md")  # a missing file: nothing to do
  assert not (tmp_path / "a" / "t.md").exists()
