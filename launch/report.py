"""Writes WORKDIR/report.html: one self-contained page to explore a run's tree.

    python -m launch.report --workdir=runs/demo      # then open runs/demo/report.html

The tree with each node's share of the images; clicking a node (inner or leaf) shows its share,
its label histogram (labelled datasets), its most probable real images with their file names, and,
after launch/sample.py, the TreeVAE's and the diffusion model's generations; a panel shows
stage1_metrics.json and eval/metrics.json. Images are inlined: the page works from file:// with no
server or network. train_treevae.py, sample.py and evaluate.py write it again when they finish.
"""

from absl import flags

from launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory whose stage 1 has finished.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  from tree_diffusion import checkpoint, files  # pylint: disable=g-import-not-at-top
  from tree_diffusion import html_report, runs  # pylint: disable=g-import-not-at-top

  common.check_run_dir(_WORKDIR.value)
  run_dir = runs.RunDir(_WORKDIR.value)
  if not files.exists(run_dir.assignments):
    raise checkpoint.CheckpointError(
      f"{run_dir.assignments} does not exist: run python -m launch.train_treevae with this --workdir "
      f"first (it writes the file at the end of stage 1)"
    )
  runs.check_writable(
    _WORKDIR.value, "make the run directory writable (the page is written to WORKDIR/report.html)"
  )
  path = html_report.write(_WORKDIR.value)
  size = len(files.read_bytes(path))
  print(
    f"report: {path} ({size / 1e6:.1f} MB)"
    if size >= 1e6
    else f"report: {path} ({size / 1e3:.0f} KB)"
  )


if __name__ == "__main__":
  common.run(main)
