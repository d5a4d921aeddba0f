"""Imports models trained by the reference PyTorch code as a run directory, without torch.

    python -m launch.import_reference --config=configs/mnist.py --workdir=runs/mnist_reference \
        --reference_config=TreeDiffusion/configs/mnist.yml \
        --treevae_weights=models/experiments/mnist/.../model_weights.pt \
        --ddpm_checkpoint=results/checkpoints/ddpmv2-vae-epoch=999-loss=0.0000.ckpt

Then sample and evaluate it as any run: ``python -m launch.sample --workdir=runs/mnist_reference``.

--treevae_weights is the reference TreeVAE's ``model_weights.pt`` (its ``state_dict``); the tree
is read from which nodes own routers and decoders. --ddpm_checkpoint (optional) is the PyTorch
Lightning checkpoint its ``train_ddpm.py`` writes: the online UNet becomes the parameters, the EMA
copy the EMA parameters, its ``global_step`` the checkpoint step (the optimiser starts afresh).
--reference_config is the YAML both were trained with: the TreeVAE architecture comes from its
``training`` section and the UNet, schedule and conditioning from its ``ddpm`` section;
everything else (the data, sampling, evaluation) from --config, whose image size and channels
must match the YAML's. Files are read without torch; a file that holds anything but tensors and
plain values is refused, so no code in it runs.
"""

import os

from absl import flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "New run directory to write the models into.")
_REFERENCE_CONFIG = flags.DEFINE_string(
  "reference_config", None, "The reference YAML config the models were trained with."
)
_TREEVAE = flags.DEFINE_string(
  "treevae_weights", None, "The reference TreeVAE's model_weights.pt (a state_dict)."
)
_DDPM = flags.DEFINE_string(
  "ddpm_checkpoint", None, "Optional: the reference diffusion model's Lightning .ckpt."
)
flags.mark_flags_as_required(["config", "workdir", "reference_config", "treevae_weights"])


def _read_yaml(path: str) -> dict:
  import yaml  # pylint: disable=g-import-not-at-top
  from tree_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(path):
    raise ConfigError(f"--reference_config={path} is not a file: pass the reference's YAML")
  with open(path) as f:
    try:
      parsed = yaml.safe_load(f)
    except yaml.YAMLError as e:
      raise ConfigError(f"--reference_config={path} is not YAML ({e})".replace("\n", " "))
  if not isinstance(parsed, dict):
    raise ConfigError(f"--reference_config={path} holds no mapping of settings")
  return parsed


def main(argv):
  del argv
  common.setup()
  from tree_diffusion import files  # pylint: disable=g-import-not-at-top
  from tree_diffusion.diffusion import reference as ddpm_ref  # pylint: disable=g-import-not-at-top
  from tree_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from tree_diffusion.runs import RunDir  # pylint: disable=g-import-not-at-top
  from tree_diffusion.treevae import reference as tvae_ref  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  workdir = _WORKDIR.value
  for flag, path in (("--treevae_weights", _TREEVAE.value), ("--ddpm_checkpoint", _DDPM.value)):
    if path and not os.path.isfile(path):
      raise ConfigError(f"{flag}={path} is not a file")
  reference = _read_yaml(_REFERENCE_CONFIG.value)
  updates = tvae_ref.config_updates(reference)
  want = (updates["data.image_size"], updates["data.channels"])
  have = (config.data.image_size, config.data.channels)
  if want != have:
    raise ConfigError(
      f"the reference model takes {want[0]}x{want[0]}x{want[1]} images but config.data "
      f"({config.data.name}) has {have[0]}x{have[0]}x{have[1]}: pass the config of the dataset "
      f"it was trained on"
    )
  if _DDPM.value:
    updates.update(ddpm_ref.config_updates(reference))
  run_dir = RunDir(workdir)
  if files.exists(run_dir.export) or files.exists(run_dir.stage2_checkpoints):
    raise ConfigError(
      f"--workdir={workdir} already holds a run (its export or stage-2 checkpoints): import "
      f"into a new --workdir"
    )
  tvae_ref.apply_updates(config, updates)
  common.check_config(config)
  source = {
    "reference_config": os.path.abspath(_REFERENCE_CONFIG.value),
    "treevae_weights": os.path.abspath(_TREEVAE.value),
    "num_classes": (reference.get("data") or {}).get("num_clusters_data"),
  }
  tvae_ref.import_treevae(config, _TREEVAE.value, workdir, source)
  print(f"stage 1: {_TREEVAE.value} -> {run_dir.export}")
  if _DDPM.value:
    source["ddpm_checkpoint"] = os.path.abspath(_DDPM.value)
    step = ddpm_ref.import_ddpm(config, _DDPM.value, workdir, source)
    print(f"stage 2: {_DDPM.value} -> {run_dir.stage2_checkpoints} (step {step})")


if __name__ == "__main__":
  common.run(main)
