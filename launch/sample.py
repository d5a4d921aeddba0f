"""Samples a trained stage 2: PNG grids and .npz per mode, and the tree figure with diffusion samples.

    python -m launch.sample --workdir=runs/demo
    python -m launch.sample --workdir=runs/mnist --modes=sample --num_samples=10000 \
        --config.diffusion.sampling.steps=50

Without --config, the run's own config is used: the one its training commands recorded
(WORKDIR/diffusion/config.json, else WORKDIR/config.json), read by configs/run.py as if
--config=configs/run.py:WORKDIR had been passed first, so --config.x=... overrides apply to it as
to any config file. Only the settings of sampling and evaluation (diffusion.sampling.*, eval.*,
classifier.*, batch sizes: checkpoint.RUN_SETTINGS) may differ from the run's config; a key that
contradicts it (--config.diffusion.unet.ch=16 on a run trained with 8) is refused. An explicit
--config (needed for a run trained before runs recorded their config) is checked the same way.

Modes (the reference's): sample (prior → drawn leaf → diffusion), sample_all_leaves (every leaf
for the same prior sample), recons and recons_all_leaves (from test images). Outputs go to
WORKDIR/diffusion/samples/<mode>/ and WORKDIR/diffusion/tree.png.

Synthetic images per cluster: --export_dir=DIR writes DIR/leaf_<id>/<n>.png and DIR/index.csv
(file, leaf, path, generator, draw), --export_per_leaf=N images per leaf (default 16) or
--export_total=N in all, shared in proportion to the leaves' training images. They come from the
diffusion model, or from the TreeVAE when stage 2 has not run (then only the export is written).
Each draw is one prior sample decoded through every leaf's path (the reference's
sample_all_leaves), with seed diffusion.sampling.seed.

With --distributed (one process per host, as for training) every batch is split over every
process's devices and process 0 writes the outputs, the same bits as one process writes.
"""

from absl import flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (default: the run's own, configs/run.py:WORKDIR).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of stages 1 and 2.")
_MODES = flags.DEFINE_list(
  "modes", ["sample", "sample_all_leaves", "recons", "recons_all_leaves"], "Sampling modes to run."
)
_NUM = flags.DEFINE_integer(
  "num_samples",
  None,
  "Samples (or test images) per mode; default config.diffusion.sampling.num_samples.",
  lower_bound=1,
)
_STEP = flags.DEFINE_integer(
  "step", None, "Stage-2 checkpoint step (default: latest).", lower_bound=0
)
_FIGURE = flags.DEFINE_bool(
  "figure", True, "Write the tree figure with per-leaf diffusion samples."
)
_EXPORT_DIR = flags.DEFINE_string(
  "export_dir", None, "Write generated PNGs per leaf there (DIR/leaf_<id>/<n>.png, index.csv)."
)
_EXPORT_PER_LEAF = flags.DEFINE_integer(
  "export_per_leaf", None, "Images per leaf for --export_dir (default 16).", lower_bound=1
)
_EXPORT_TOTAL = flags.DEFINE_integer(
  "export_total", None, "Images in all for --export_dir, shared by leaf size.", lower_bound=1
)
flags.mark_flags_as_required(["workdir"])
common.config_defaults_to_run("workdir")


def main(argv):
  del argv
  common.setup()
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None:
    common.check_run_dir(workdir)
  common.check_config(config)
  common.check_against_run(config, workdir)  # only sampling settings may differ from the run's
  # After setup(): jax is configured first.
  from tree_diffusion import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from tree_diffusion.diffusion.checkpoints import Stage2Checkpoints
  from tree_diffusion import files, lock, runs  # pylint: disable=g-import-not-at-top
  from tree_diffusion import validation  # pylint: disable=g-import-not-at-top
  from tree_diffusion.diffusion import generate, sampler  # pylint: disable=g-import-not-at-top
  from tree_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top

  if not _MODES.value:
    raise ConfigError(f"--modes is empty; use some of {','.join(sampler.MODES)}")
  bad = [m for m in _MODES.value if m not in sampler.MODES]
  if bad:
    raise ConfigError(f"unknown mode(s) {bad}; use --modes with some of {','.join(sampler.MODES)}")
  validation.check_data(config)
  sampler.check_config(config)
  if _EXPORT_PER_LEAF.value is not None and _EXPORT_TOTAL.value is not None:
    raise ConfigError(
      "pass one of --export_per_leaf (images per leaf) and --export_total "
      "(images in all, shared by leaf size)"
    )
  if _EXPORT_DIR.value is None and (_EXPORT_PER_LEAF.value or _EXPORT_TOTAL.value):
    raise ConfigError(
      "--export_per_leaf and --export_total need --export_dir=DIR (where the images go)"
    )
  # Everything that can be refused is, before the checkpoint is read and the sampler compiled.
  common.check_run_dir(workdir)
  run_dir = runs.RunDir(workdir)
  ckpt_dir = run_dir.stage2_checkpoints
  steps = Stage2Checkpoints.steps_in(ckpt_dir)
  fix = "make it writable, or copy the run to a directory you can write to and pass that --workdir"
  if _EXPORT_DIR.value is not None:
    files.check_path(_EXPORT_DIR.value, "--export_dir")
    runs.check_writable(_EXPORT_DIR.value, "pass an --export_dir you can write to")
    if _EXPORT_TOTAL.value is not None:  # each leaf gets one at least: refused before any work
      from tree_diffusion.tree import Tree  # pylint: disable=g-import-not-at-top
      from tree_diffusion.treevae import export as export_lib  # pylint: disable=g-import-not-at-top

      path = export_lib.resolve_export(config.diffusion.treevae_export or run_dir.export)
      leaves = Tree.from_json(export_lib.read_export_meta(path)["tree"]).num_leaves
      if _EXPORT_TOTAL.value < leaves:
        raise ConfigError(
          f"--export_total={_EXPORT_TOTAL.value} is fewer than the run's {leaves} "
          f"leaves, and each leaf gets at least one image: pass "
          f"--export_total={leaves} or more, or --export_per_leaf=N"
        )
  if not steps and _EXPORT_DIR.value is not None:  # no stage 2: the TreeVAE's images only
    _export(workdir, config, None)
    common.refresh_report(workdir)
    return
  if not steps:
    raise ckpt_lib.CheckpointError(
      f"no stage-2 checkpoint in {ckpt_dir}: run "
      f"python -m launch.train_diffusion with this --workdir first (or pass "
      f"--export_dir=DIR for the TreeVAE's images per leaf)"
    )
  if _STEP.value is not None and _STEP.value not in steps:
    raise ckpt_lib.CheckpointError(
      f"no stage-2 checkpoint {_STEP.value} in {ckpt_dir}; have "
      f"{steps}: pass one of them as --step (or none: the latest)"
    )
  runs.check_writable(run_dir.samples(), fix)
  if _FIGURE.value:
    runs.check_writable(run_dir.stage2, fix + " (or pass --nofigure)")
  samples_dir = run_dir.samples()
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() == 0:  # with --distributed, every process samples and process 0 writes
    files.makedirs(samples_dir)
  with lock.locked_workdir(samples_dir, "sampling (launch/sample.py)"):  # one sampler at a time
    stage2 = generate.load_stage2(config, workdir, _STEP.value)
    summary = generate.sample_modes(stage2, workdir, _MODES.value, _NUM.value)
    lines = [
      f"{m}: {v['images']} images in {v['wall_time_s']:.0f} s" for m, v in summary["modes"].items()
    ]
    if _FIGURE.value:
      lines.append(f"figure: {generate.write_tree_figure(stage2, workdir)}")
    if _EXPORT_DIR.value is not None:
      _export(workdir, config, stage2)
  if jax.process_index() == 0:
    print("\n".join(lines))
  common.refresh_report(workdir)


def _export(workdir, config, stage2):
  """--export_dir: generated images per leaf, from ``stage2`` (else the TreeVAE)."""
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from tree_diffusion.diffusion import trained  # pylint: disable=g-import-not-at-top

  run = trained.load_run(workdir, config)
  run._stage2 = stage2  # pylint: disable=protected-access  (the checkpoint already loaded)
  per_leaf = _EXPORT_PER_LEAF.value
  if per_leaf is None and _EXPORT_TOTAL.value is None:
    per_leaf = 16
  generator = trained.DIFFUSION if stage2 is not None else trained.TREEVAE
  if stage2 is None:
    logging.info("no stage-2 checkpoint in %s: exporting the TreeVAE's generations", workdir)
  out = run.export_images(
    _EXPORT_DIR.value,
    per_leaf=per_leaf,
    total=_EXPORT_TOTAL.value,
    seed=config.diffusion.sampling.seed,
    generator=generator,
    progress=lambda text: logging.info("%s", text),
  )
  if jax.process_index() == 0:
    print(
      f"export: {sum(out['counts'].values())} {out['generator']} images in "
      f"{len(out['counts'])} leaf folders, index {out['index']}"
    )


if __name__ == "__main__":
  common.run(main)
