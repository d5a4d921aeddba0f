"""MNIST, the reference's CNN-TreeVAE hyper-parameters.

    python -m launch.prepare_data --dataset=mnist          # once, needs network + tensorflow-cpu
    python -m launch.train_treevae --config=configs/mnist.py --workdir=runs/mnist

``configs/mnist.py:tiny`` runs in seconds on CPU.
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, allowed=common.ARGS, config_file=__file__)
  c = common.base()
  c.data.name = "mnist"
  if args.get("tiny"):
    c = common.tiny(c)
  if args.get("reference"):
    c = common.reference(c)
  return c
