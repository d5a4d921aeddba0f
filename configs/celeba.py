"""CelebA at 64×64 (crop 148 at (40, 15), resize): 35 epochs per phase, batch 128.

python -m launch.prepare_data --dataset=celeb_a
python -m launch.train_treevae --config=configs/celeba.py --workdir=runs/celeba
"""

from configs import cifar10, common


def get_config(arg=None):
  args = common.parse_arg(arg, allowed=common.ARGS, config_file=__file__)
  c = cifar10.colour(common.base(), 64, res_connections=False)
  c.data.name = "celeb_a"
  c.stage1.batch_size = 128
  c.stage1.num_epochs = 35
  c.stage1.num_epochs_smalltree = 35
  c.stage1.augmentation = "celeba"
  # Stage 2, as the reference's CelebA config: five levels, batch 32, 200 epochs.
  c.diffusion.unet.ch_mults = (1, 2, 2, 2, 4)
  c.diffusion.batch_size = 32
  c.diffusion.sampling.batch_size = 32
  c.diffusion.num_epochs = 200
  if args.get("tiny"):
    c = cifar10.tiny_colour(c)
  if args.get("reference"):
    c = common.reference(c)
  return c
