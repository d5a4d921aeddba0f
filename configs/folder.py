"""Your own folder of images: its groups and sub-groups, on a laptop.

    python -m launch.train_treevae --config=configs/folder.py \\
        --config.data.folder=/path/to/images --workdir=runs/my_images

A schedule meant to find groups in a few thousand images on a CPU (stage 1 of 5,000 28x28 images
took about 8 minutes on 2 cores: docs/own_images.md), not a smoke test. The settings a user
sets:

- ``data.folder``: the folder. Flat (no labels), or one subfolder per label; searched recursively.
- ``data.image_size`` (default 32): every image is center-cropped to a square and resized to this
  size (``data.resize=True``); set it once, e.g. ``--config.data.image_size=64``. Larger images
  cost time roughly in proportion to their pixels.
- ``data.channels`` (default 0: from the images): 1 when every image is grey, 3 otherwise; a folder
  that mixes both is read as RGB with a one-line notice. 1 or 3 forces it.
- ``stage1.num_clusters_tree`` (default 10): the number of leaves, i.e. groups, the tree grows to.
  Growing stops earlier when no leaf has enough images to split (pruning can remove near-empty
  leaves at the end).
- ``data.test_fraction`` (default 0.1): the share held out as the test split (per label when
  there are labels). ``0`` uses every image for training and testing.
- ``data.data_dir``: where the decoded copy of the folder is written once (default
  ``~/tensorflow_datasets/local_images/<folder>_<hash>/``; printed when it is made).

The network and schedule are the demo's (``configs/demo.py``: half the reference's MNIST
channels, 30 initial epochs, 15 per new split, 30 of fine-tuning, batch 128), sized for a few
thousand images: with many more images per epoch, fewer epochs do (``--config.stage1.num_epochs``
and ``num_epochs_smalltree``, ``num_epochs_finetuning``). ``:tiny`` is a smoke test of seconds.
"""

from configs import common, demo


def get_config(arg=None):
  args = common.parse_arg(arg, allowed=common.ARGS, config_file=__file__)
  c = demo.get_config("tiny" if args.get("tiny") else None)
  c.data.update(dict(name="folder", folder="", image_size=32, channels=0, resize=True))
  c.stage1.num_clusters_tree = 10 if not args.get("tiny") else c.stage1.num_clusters_tree
  if args.get("reference"):
    c = common.reference(c)
  return c
