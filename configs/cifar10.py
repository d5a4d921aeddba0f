"""CIFAR-10: ResNet encoder (cnn2), 4×4 feature-map latents, contrastive routers.

python -m launch.prepare_data --dataset=cifar10
python -m launch.train_treevae --config=configs/cifar10.py --workdir=runs/cifar10
"""

from configs import common


def colour(c, image_size, res_connections):
  """Shared by the colour datasets: cnn2, R=4, 64/128 channels, mse output, contrastive."""
  c.data.image_size = image_size
  c.data.channels = 3
  c.treevae.encoder = "cnn2"
  c.treevae.representation_dim = 4
  c.treevae.latent_channels = (64,) * 7
  c.treevae.bottom_up_channels = (128,) * 7
  c.treevae.res_connections = res_connections
  c.treevae.output = "mse"
  s = c.stage1
  s.intermediate_fulltrain = False
  s.num_epochs_intermediate_fulltrain = 0
  s.num_epochs_finetuning = 0
  s.kl_start = 0.01
  s.decay_kl = 0.01
  s.augment = True
  s.augmentation_method = "InfoNCE,instancewise_full"
  s.aug_decisions_weight = 100.0
  # Stage 2, as the reference's CIFAR-10 config: ch 128, attention at downsampling factor 8 (the
  # 4×4 level).
  c.diffusion.unet.update(dict(ch=128, attn_resolutions=(16, 8)))
  c.diffusion.batch_size = 64
  c.diffusion.sampling.batch_size = 64
  return c


def tiny_colour(c):
  c = common.tiny(c)
  c.treevae.latent_channels = (4,) * 4
  c.treevae.bottom_up_channels = (8,) * 4
  return c


def get_config(arg=None):
  args = common.parse_arg(arg, allowed=common.ARGS, config_file=__file__)
  c = colour(common.base(), 32, res_connections=True)
  c.data.name = "cifar10"
  c.stage1.augmentation = "cifar"
  if args.get("tiny"):
    c = tiny_colour(c)
  if args.get("reference"):
    c = common.reference(c)
  return c
