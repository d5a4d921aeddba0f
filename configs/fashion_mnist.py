"""Fashion-MNIST: as MNIST but ``kl_start=0.5`` (the reference's fork config).

    python launch/prepare_data.py --dataset=fashion_mnist
    python launch/train_treevae.py --config=configs/fashion_mnist.py --workdir=runs/fmnist
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, allowed=("tiny",), config_file=__file__)
  c = common.base()
  c.data.name = "fashion_mnist"
  c.stage1.kl_start = 0.5
  if args.get("tiny"):
    c = common.tiny(c)
  return c
