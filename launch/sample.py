"""Samples a trained stage 2: PNG grids and .npz per mode, and the tree figure with diffusion samples.

    python launch/sample.py --config=configs/demo.py --workdir=runs/demo
    python launch/sample.py --config=configs/mnist.py --workdir=runs/mnist \
        --modes=sample --num_samples=10000

Modes (the reference's): sample (prior → drawn leaf → diffusion), sample_all_leaves (every leaf
for the same prior sample), recons and recons_all_leaves (from test images). Outputs go to
WORKDIR/diffusion/samples/<mode>/ and WORKDIR/diffusion/tree.png.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch import common  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of stages 1 and 2.")
_MODES = flags.DEFINE_list("modes", ["sample", "sample_all_leaves", "recons", "recons_all_leaves"],
                           "Sampling modes to run.")
_NUM = flags.DEFINE_integer("num_samples", None,
                            "Samples (or test images) per mode; default config.diffusion.sampling.num_samples.")
_STEP = flags.DEFINE_integer("step", None, "Stage-2 checkpoint step (default: latest).")
_FIGURE = flags.DEFINE_bool("figure", True, "Write the tree figure with per-leaf diffusion samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  common.setup()
  common.check_config(_CONFIG.value)
  from tree_diffusion.diffusion import generate, sampler  # after setup()
  from tree_diffusion.errors import ConfigError
  bad = [m for m in _MODES.value if m not in sampler.MODES]
  if bad:
    raise ConfigError(f"unknown mode(s) {bad}; use --modes with some of {','.join(sampler.MODES)}")
  stage2 = generate.load_stage2(_CONFIG.value, _WORKDIR.value, _STEP.value)
  summary = generate.sample_modes(stage2, _WORKDIR.value, _MODES.value, _NUM.value)
  lines = [f"{m}: {v['images']} images in {v['wall_time_s']:.0f} s" for m, v in summary["modes"].items()]
  if _FIGURE.value:
    lines.append(f"figure: {generate.write_tree_figure(stage2, _WORKDIR.value)}")
  print("\n".join(lines))


if __name__ == "__main__":
  common.run(main)
