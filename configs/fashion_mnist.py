"""Fashion-MNIST: as MNIST but ``kl_start=0.5`` (the reference's fork config).

python -m launch.prepare_data --dataset=fashion_mnist
python -m launch.train_treevae --config=configs/fashion_mnist.py --workdir=runs/fmnist
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, allowed=common.ARGS, config_file=__file__)
  c = common.base()
  c.data.name = "fashion_mnist"
  c.stage1.kl_start = 0.5
  if args.get("tiny"):
    c = common.tiny(c)
  if args.get("reference"):
    c = common.reference(c)
  return c
