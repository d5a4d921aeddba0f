"""CUBICC at 64×64 from a folder with one subfolder per class.

The reference's cubicc.yml trains 1 epoch per phase, almost certainly a debug leftover
(1 epoch cannot grow a useful tree); we use the CIFAR-10 schedule (150/150) instead.

    python -m launch.train_treevae --config=configs/cubicc.py --config.data.folder=/path/to/cubicc \
        --workdir=runs/cubicc

The folder: one subfolder per class (``<folder>/<class>/<row>.png``). For the reference's split,
put its ``train_split.npy``, ``test_split.npy`` and ``validation_split.npy`` in the folder and
name each image by its row in the reference's arrays: train is train_split, test is test_split
and validation_split together. Without those files the test split is a seeded 10 % of each class,
with a warning.
"""

from configs import cifar10, common


def get_config(arg=None):
  args = common.parse_arg(arg, allowed=common.ARGS, config_file=__file__)
  c = cifar10.colour(common.base(), 64, res_connections=True)
  c.data.name = "cubicc"
  c.stage1.augmentation = "cifar"
  # Stage 2, as the reference's CUBICC config: five levels, batch 32, 500 epochs.
  c.diffusion.unet.ch_mults = (1, 2, 2, 2, 4)
  c.diffusion.batch_size = 32
  c.diffusion.sampling.batch_size = 32
  c.diffusion.num_epochs = 500
  if args.get("tiny"):
    c = cifar10.tiny_colour(c)
  if args.get("reference"):  # and its one-epoch stage-1 phases (docs/deviations.md)
    c = common.reference(c)
    c.stage1.num_epochs = c.stage1.num_epochs_smalltree = 1
  return c
