"""Prints one table for a run directory and writes it to WORKDIR/summary.md.

    python -m launch.summarize --workdir=runs/demo
    python -m launch.summarize --workdir=runs/demo --times=stage1=230,stage2=300

Clustering (test NMI and leaf purity, against k-means on pixels), FID of generations and
reconstructions and the purity of generations for the TreeVAE and the diffusion model (from
launch/evaluate.py's latest checkpoint), and the wall time of each step: --times (seconds, as
./demo.sh measures around each command) or else the times the launchers recorded.
"""

from absl import flags

from launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_TIMES = flags.DEFINE_list(
  "times", [], "step=seconds pairs (stage1, stage2, sampling, evaluation)."
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  import math  # pylint: disable=g-import-not-at-top
  from tree_diffusion import files, runs  # pylint: disable=g-import-not-at-top
  from tree_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from tree_diffusion.eval import report  # pylint: disable=g-import-not-at-top

  common.check_run_dir(_WORKDIR.value)
  run_dir = runs.RunDir(_WORKDIR.value)
  if not files.is_file(run_dir.stage1_metrics):
    raise ConfigError(
      f"{_WORKDIR.value} has no stage1_metrics.json: run python -m launch.train_treevae "
      f"with this --workdir first"
    )
  times = {}
  for item in _TIMES.value:
    k, _, v = item.partition("=")
    try:
      if k not in report.STEPS:
        raise ValueError
      times[k] = float(v)
      if not (math.isfinite(times[k]) and times[k] >= 0):
        raise ValueError
    except ValueError:
      raise ConfigError(
        f"--times takes step=seconds (seconds >= 0) with a step among "
        f"{', '.join(report.STEPS)}, got {item!r}"
      ) from None
  path = run_dir.summary
  if files.is_dir(path):
    raise ConfigError(f"{path} is a directory: remove it (the summary is written there)")
  runs.check_writable(
    _WORKDIR.value, "make the run directory writable (the summary is written to WORKDIR/summary.md)"
  )
  text = report.summary_table(_WORKDIR.value, times)
  files.write_text(path, text)
  print(text + f"\n-> {path}")


if __name__ == "__main__":
  common.run(main)
