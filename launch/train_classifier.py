"""Trains the per-leaf purity classifier of a dataset (a ResNet trained from scratch).

    python -m launch.train_classifier --config=configs/demo.py --workdir=runs/demo
    python -m launch.train_classifier --config=configs/cifar10.py --workdir=runs/cifar10 \
        --config.classifier.num_epochs=20

Trains on the config's train split, evaluates on its test split and writes classifier.msgpack and
classifier.json into WORKDIR/classifier/ (or --config.classifier.dir). Every run starts afresh and
overwrites the previous classifier.
"""

from absl import flags, logging
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run directory; the classifier goes to WORKDIR/classifier."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  common.setup()
  common.check_config(_CONFIG.value)
  # After setup(): jax is configured first.
  from tree_diffusion import data as data_lib  # pylint: disable=g-import-not-at-top
  from tree_diffusion import runs  # pylint: disable=g-import-not-at-top
  from tree_diffusion import validation  # pylint: disable=g-import-not-at-top
  from tree_diffusion.eval import classifier as clf  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  validation.check_data(config)
  validation.check_classifier(config)
  logging.info("config:\n%s", config.classifier)
  out_dir = clf.classifier_dir(config.classifier, _WORKDIR.value)
  runs.check_writable(
    out_dir,
    "pass a --workdir you can write to"
    + (" or another --config.classifier.dir" if config.classifier.dir else ""),
  )
  train = data_lib.load_arrays(config.data, "train")
  data_lib.check_image_shape(train, config.data)
  test = data_lib.load_arrays(config.data, "test")
  data_lib.check_image_shape(test, config.data)
  classifier, metrics = clf.train_classifier(config, train, test)
  clf.save_classifier(out_dir, classifier)
  print(
    f"classifier: test accuracy {metrics['test_accuracy']:.4f} on {len(test)} "
    f"{config.data.name} test images, {metrics['steps']} steps, {metrics['parameters']:,} "
    f"parameters, {metrics['wall_time_s']:.0f} s -> {out_dir}"
  )


if __name__ == "__main__":
  common.run(main)
