"""Places new images into a trained run's tree: one CSV row per image with its leaf.

    python -m launch.assign --workdir=runs/demo --images=new_images/ --output=placed.csv
    python -m launch.assign --workdir=runs/demo --images='scans/*.png' --output=placed.csv

--images is a folder (searched recursively; files with other extensions are skipped and counted)
or a glob pattern (quote it). Each image is read as the run's training images were: its size and
channels, center-cropped and resized when the run resized (--resize / --noresize to choose),
transparency composited. Images are placed in batches of stage1.eval_batch_size split over the
local devices, so a run's own images get exactly the leaves and probabilities of its
assignments.csv.

The CSV (written atomically; an existing one is replaced): index, file (relative to the folder,
or as the glob matched it), leaf (node id), leaf_probability, path (root-to-leaf node ids, 0/2/5),
second_leaf, second_probability: the columns of WORKDIR/assignments.csv without split and label.
"""

import os

from absl import flags

from launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory whose stage 1 has finished.")
_IMAGES = flags.DEFINE_string("images", None, "A folder of images, or a glob pattern (quoted).")
_OUTPUT = flags.DEFINE_string("output", None, "The CSV to write (local path or gs:// URL).")
_RESIZE = flags.DEFINE_bool(
  "resize",
  None,
  "Center-crop and resize images of another size (default: as the run did, its data.resize).",
)
_BATCH = flags.DEFINE_integer(
  "batch_size", None, "Images per batch (default: the run's stage1.eval_batch_size).", lower_bound=1
)
flags.mark_flags_as_required(["workdir", "images", "output"])


def _image_paths(spec: str) -> tuple[list[str], list[str], str | None]:
  """``(paths, skipped, root)`` for ``--images``: a folder's image files (``root`` = the folder,
  names in the CSV relative to it), else the files a glob pattern matches (``root`` None)."""
  import glob  # pylint: disable=g-import-not-at-top
  from tree_diffusion import data  # pylint: disable=g-import-not-at-top

  if os.path.isdir(spec):
    names, skipped = data.list_image_files(spec)
    return [os.path.join(spec, n) for n in names], skipped, spec
  if not glob.has_magic(spec):
    if not os.path.exists(spec):
      raise data.DataError(
        f"--images={spec} does not exist: pass a folder of images or a glob "
        f"pattern such as --images='photos/*.jpg'"
      )
    return [spec], [], None
  matched = sorted(p for p in glob.glob(spec, recursive=True) if not os.path.isdir(p))
  paths = [p for p in matched if data.is_image_name(p)]
  return paths, [p for p in matched if not data.is_image_name(p)], None


def main(argv):
  del argv
  common.setup()
  import time  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from tree_diffusion import data, files, image_files, runs  # pylint: disable=g-import-not-at-top
  from tree_diffusion.diffusion import trained  # pylint: disable=g-import-not-at-top
  from tree_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top

  output = _OUTPUT.value
  files.check_path(output, "--output")
  common.check_run_dir(_WORKDIR.value)
  # Before any work: the output can be written, and there are images to read.
  if files.is_dir(output):
    raise ConfigError(f"--output={output} is a directory: pass a file name (placed.csv)")
  parent = os.path.dirname(output.rstrip("/")) or "."
  runs.check_writable(parent, "pass an --output in a directory you can write to")
  paths, skipped, root = _image_paths(_IMAGES.value)
  if skipped:
    logging.warning(
      "skipping %d file(s) that are not images (extensions other than %s, or "
      "broken links), e.g. %s",
      len(skipped),
      "/".join(sorted(data.IMAGE_EXTENSIONS)),
      skipped[0],
    )
  if not paths:
    raise data.DataError(
      f"no image files ({'/'.join(sorted(data.IMAGE_EXTENSIONS))}) in "
      f"--images={_IMAGES.value}: pass a folder of images or a glob pattern"
    )
  run = trained.load_run(_WORKDIR.value)
  size = run.image_shape[0]
  resize = _RESIZE.value
  t0, last = time.perf_counter(), [0.0]

  def progress(done, total):
    now = time.perf_counter() - t0
    if now - last[0] >= 5.0 or done == total:
      last[0] = now
      logging.info(
        "placed %d/%d images (%.0f/s), ETA %s",
        done,
        total,
        done / max(now, 1e-9),
        runs.format_eta(now / done * (total - done)),
      )

  try:
    placed = run.assign_files(paths, resize=resize, batch_size=_BATCH.value, progress=progress)
  except image_files.ImageSizeError as e:
    was = "resized" if run.config.data.get("resize") else "did not resize"
    raise data.DataError(
      f"image {e.path} is {e.width}x{e.height} but the run's images are {size}x{size} (the run "
      f"{was} its images): pass --resize to center-crop and resize them to {size}x{size}, or "
      f"resize the files yourself"
    ) from None
  if placed.skipped:
    logging.warning(
      "skipped %d of %d file(s) that could not be read as images, e.g. %s",
      len(placed.skipped),
      len(paths),
      placed.skipped[0],
    )
  if not placed.files:
    raise data.DataError(
      f"none of the {len(paths)} file(s) of --images={_IMAGES.value} could be "
      f"read as an image: check the files"
    )
  names = trained.relative_names(placed.files, root)
  trained.write_placed(output, run.tree, names, placed.probs)
  counts = {int(n): int((placed.leaves == n).sum()) for n in run.tree.leaves}
  per_leaf = ", ".join(f"{n}: {c}" for n, c in counts.items())
  unread = len(skipped) + len(placed.skipped)
  print(
    f"placed {len(placed.files)} images into {run.tree.num_leaves} leaves ({per_leaf})"
    + (f"; skipped {unread} file(s)" if unread else "")
    + f" -> {output}"
  )


if __name__ == "__main__":
  common.run(main)
