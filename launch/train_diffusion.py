"""Stage 2: trains (or resumes) the cluster-conditional diffusion model on a stage-1 export.

    python -m launch.train_diffusion --config=configs/demo.py --workdir=runs/demo
    python -m launch.train_diffusion --config=configs/mnist.py --workdir=runs/mnist \
        --config.diffusion.conditioning=image+path

The stage-1 export is read from WORKDIR/export (what launch/train_treevae.py writes) unless
--config.diffusion.treevae_export points elsewhere; stage 2 writes into WORKDIR/diffusion/.
Re-running the command resumes from the latest checkpoint.
"""

from absl import flags, logging
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (holds the stage-1 export).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  common.setup()
  common.check_config(_CONFIG.value)
  from tree_diffusion import preemption  # after setup(): jax is configured first
  from tree_diffusion.diffusion import train
  from tree_diffusion.runs import RunDir

  logging.info("config:\n%s", _CONFIG.value.diffusion)
  with preemption.StopRequest() as stop:  # SIGTERM / Ctrl-C: checkpoint, then exit 0
    summary = train.train_and_save(_CONFIG.value, _WORKDIR.value, stop=stop)
  print(
    f"stage 2: {summary['steps']} steps, {summary['conditioning']} conditioning, "
    f"{summary['parameters']:,} parameters -> {RunDir(_WORKDIR.value).stage2}"
  )


if __name__ == "__main__":
  common.run(main)
