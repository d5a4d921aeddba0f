"""Stage 1: trains (or resumes) a TreeVAE, then writes its export, metrics and tree figure.

    python -m launch.train_treevae --config=configs/demo.py --workdir=runs/demo
    python -m launch.train_treevae --config=configs/mnist.py --workdir=runs/mnist \
        --config.stage1.num_epochs=50
"""

from absl import flags, logging
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, export and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  common.setup()
  common.check_config(_CONFIG.value)
  from tree_diffusion import preemption  # after setup(): jax is configured first
  from tree_diffusion.treevae import train

  logging.info("config:\n%s", _CONFIG.value)
  with preemption.StopRequest() as stop:  # SIGTERM / Ctrl-C: checkpoint, then exit 0
    metrics = train.train_and_export(_CONFIG.value, _WORKDIR.value, stop=stop)
  test = metrics["test"]
  scores = (
    f"test NMI {test['nmi']:.3f}  leaf purity {test['leaf_purity']:.3f}"
    if "nmi" in test
    else "no labels: see tree.png and stage1_metrics.json"
  )
  print(f"leaves {metrics['num_leaves']}  {scores}  -> {_WORKDIR.value}")
  common.refresh_report(_WORKDIR.value)


if __name__ == "__main__":
  common.run(main)
