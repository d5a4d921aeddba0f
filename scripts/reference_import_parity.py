"""Writes the parity files of ``tests/test_import_reference.py``: small models built by the
ORIGINAL reference code (JoGo175/TreeDiffusion), saved as that code saves them, and their outputs.

Runs with torch (never installed into the project's virtualenv) on a checkout of the reference::

  python3 -m venv /tmp/torchenv
  /tmp/torchenv/bin/pip install torch==2.13.0 numpy pyyaml scikit-learn scipy tqdm
  /tmp/torchenv/bin/python scripts/reference_import_parity.py --reference=/path/to/TreeDiffusion

Files written to ``tests/data/``:

* ``reference_cnn1.pt``: the ``state_dict`` of a grey 28×28 ``cnn1`` TreeVAE (latent channels 4,
  bottom-up 8, three levels), grown to depth 2 and then pruned as the reference prunes: the left
  leaf under the root's right child is removed, so that child is a pass-through node whose only
  child is on the right, and it keeps its (unused) q-router.
* ``reference_cnn2.pt``: a colour 8×8 ``cnn2`` TreeVAE (two down-sampling steps, residual
  connections, ReLU, ``mse`` output, contrastive ``InfoNCE,instancewise_full`` heads), depth 1.
* ``reference_ddpm.ckpt``: a dict laid out as PyTorch Lightning saves ``DDPMWrapper``
  (``state_dict`` with ``online_network.*``, ``target_network.*`` and ``vae.*``, plus
  ``epoch``, ``global_step``, ``pytorch-lightning_version``, ``hyper_parameters`` holding an object
  of a class defined here, and ``optimizer_states``). The UNet is the reference's
  ``SuperResModel`` (``form1``, ``z_signal: path``), 32 channels, levels (1, 1), one residual
  block, attention at downsampling 2. The EMA copy shares every tensor with the online network
  except ``time_embed.0.bias`` (+1), which keeps the file small and still tells them apart.
* ``reference_import.json``: the two TreeVAE configs and the DDPM config in the reference's
  YAML layout.
* ``reference_import.npz``: inputs and outputs. For each TreeVAE (eval mode, every latent sample
  replaced by its mean so that the pass is deterministic): ``x`` (NHWC), ``p_c_z``, every leaf's
  reconstruction (``[K, B, H, W, C]``), ``rec_loss``, ``kl_root``, ``kl_nodes``, ``kl_decisions``.
  For the UNet: ``x_t`` and the condition image (NHWC), ``t``, the path of each sample as node ids
  and latents (``[B, D, C, R, R]``, channel-first as the reference takes them) with a mask, and the
  predicted noise of the online and the EMA network (NHWC).

Weights are torch's default initialisation (seed 0), with BatchNorm and GroupNorm affine
parameters, running statistics and the zero-initialised output layers redrawn from NumPy
(seed 1), so that no layer is the identity. Computed in float32 on CPU.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import types

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data")

CNN1 = dict(
  inp_shape=28,
  inp_channels=1,
  representation_dim=2,
  latent_channels=[4, 4, 4],
  bottom_up_channels=[8, 8, 8],
  initial_depth=2,
  act_function="swish",
  activation="sigmoid",
  encoder="cnn1",
  dropout_router=0.0,
  res_connections=False,
  dim_mod_conv=True,
  augment=False,
  augmentation_method="simple",
  aug_decisions_weight=1,
  spectral_norm=False,
  kl_start=0.0,
)
CNN2 = dict(
  CNN1,
  inp_shape=8,
  inp_channels=3,
  latent_channels=[4, 4],
  bottom_up_channels=[8, 8],
  initial_depth=1,
  act_function="relu",
  activation="mse",
  encoder="cnn2",
  res_connections=True,
  augment=True,
  augmentation_method="InfoNCE,instancewise_full",
)
DDPM = dict(
  data=dict(image_size=28, inp_channels=1),
  model=dict(
    dim=32,
    attn_resolutions="2,",
    n_residual=1,
    dim_mults="1,1",
    dropout=0.0,
    n_heads=2,
    beta1=1e-4,
    beta2=0.02,
    n_timesteps=1000,
  ),
  training=dict(z_cond=True, z_dim=16, z_signal="path", type="form1", cfd_rate=0.0),
)


def stub_modules():
  """The reference imports wandb, torchmetrics and matplotlib; none is used here."""
  wandb = types.ModuleType("wandb")
  sys.modules.setdefault("wandb", wandb)
  tm = types.ModuleType("torchmetrics")
  tm.Metric = type("Metric", (), {})
  sys.modules.setdefault("torchmetrics", tm)
  for name in ("matplotlib", "matplotlib.pyplot"):  # imported by the UNet module, not used
    sys.modules.setdefault(name, types.ModuleType(name))


def redraw(module: torch.nn.Module, rng: np.random.Generator):
  """Non-trivial normalisation parameters and statistics; zero-initialised layers redrawn."""
  for m in module.modules():
    if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
      n = m.weight.shape[0]
      m.weight.data = torch.from_numpy(rng.uniform(0.5, 1.5, n).astype(np.float32))
      m.bias.data = torch.from_numpy(rng.normal(0, 0.2, n).astype(np.float32))
      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
        m.running_mean.data = torch.from_numpy(rng.normal(0, 0.2, n).astype(np.float32))
        m.running_var.data = torch.from_numpy(rng.uniform(0.5, 1.5, n).astype(np.float32))
  for p in module.parameters():
    if not torch.any(p.data != 0):
      p.data = torch.from_numpy(rng.uniform(-0.05, 0.05, tuple(p.shape)).astype(np.float32))


def mean_samples():
  """Every ``td.Independent(...).rsample()`` of the TreeVAE returns its mean."""
  import torch.distributions as td  # pylint: disable=g-import-not-at-top

  td.Independent.rsample = lambda self, sample_shape=torch.Size(): self.mean


def prune_left_leaf_of_right_child(model):
  """The reference's pruning loop for one leaf: the parent drops the child and its router."""
  from utils.model_utils import return_list_tree  # pylint: disable=g-import-not-at-top

  parent = model.tree.right
  parent.prune_child(parent.left)
  transformations, routers, denses, decoders, routers_q = return_list_tree(model.tree)
  model.decisions_q, model.transformations, model.decisions = routers_q, transformations, routers
  model.denses, model.decoders = denses, decoders
  model.depth = model.compute_depth()


def treevae_case(name: str, cfg: dict, rng: np.random.Generator, batch: int, out: dict):
  from models.model import TreeVAE  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  # The reference's main.py splits the YAML's comma-separated augmentation_method into a list.
  model = TreeVAE(**dict(cfg, augmentation_method=cfg["augmentation_method"].split(",")))
  if name == "cnn1":
    prune_left_leaf_of_right_child(model)
  redraw(model, rng)
  model.eval()
  torch.save(model.state_dict(), os.path.join(OUT, f"reference_{name}.pt"))
  s, c = cfg["inp_shape"], cfg["inp_channels"]
  x = rng.uniform(0, 1, (batch, c, s, s)).astype(np.float32)
  with torch.no_grad():
    res = model(torch.from_numpy(x))
  out[f"{name}_x"] = x.transpose(0, 2, 3, 1)
  out[f"{name}_p_c_z"] = res["p_c_z"].numpy()
  out[f"{name}_recon"] = np.stack([r.numpy().transpose(0, 2, 3, 1) for r in res["reconstructions"]])
  for k in ("rec_loss", "kl_root", "kl_nodes", "kl_decisions"):
    out[f"{name}_{k}"] = np.float64(res[k].item())
  return model


def ddpm_case(vae, rng: np.random.Generator, batch: int, out: dict):
  from models.diffusion.ddpm import DDPM as DDPMNet  # pylint: disable=g-import-not-at-top
  from models.diffusion.unet_openai import SuperResModel  # pylint: disable=g-import-not-at-top

  m, t = DDPM["model"], DDPM["training"]
  torch.manual_seed(0)
  unet = SuperResModel(
    in_channels=DDPM["data"]["inp_channels"],
    model_channels=m["dim"],
    out_channels=DDPM["data"]["inp_channels"],
    num_res_blocks=m["n_residual"],
    attention_resolutions=(2,),
    channel_mult=(1, 1),
    use_checkpoint=False,
    dropout=m["dropout"],
    num_heads=m["n_heads"],
    z_dim=t["z_dim"],
    use_scale_shift_norm=True,
    use_z=True,
    z_signal="path",
  )
  redraw(unet, rng)
  unet.eval()
  online = DDPMNet(unet, beta_1=m["beta1"], beta_2=m["beta2"], T=m["n_timesteps"])
  state = collections.OrderedDict()
  for k, v in online.state_dict().items():
    state[f"online_network.{k}"] = v
  for k, v in online.state_dict().items():  # the EMA copy: the same tensors but one
    state[f"target_network.{k}"] = v + 1.0 if k == "decoder.time_embed.0.bias" else v
  for k, v in list(vae.state_dict().items())[:3]:
    state[f"vae.{k}"] = v
  hparams = Hyper()
  hparams.lr = 2e-4
  ckpt = {
    "epoch": 7,
    "global_step": 1234,
    "pytorch-lightning_version": "1.4.9",
    "state_dict": state,
    "hyper_parameters": {"hparams": hparams},
    "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2e-4}]}],
  }
  torch.save(ckpt, os.path.join(OUT, "reference_ddpm.ckpt"))

  s, c = DDPM["data"]["image_size"], DDPM["data"]["inp_channels"]
  x_t = rng.normal(0, 1, (batch, c, s, s)).astype(np.float32)
  image = rng.uniform(0, 1, (batch, c, s, s)).astype(np.float32)
  steps = np.array([0, 17, 500, 999][:batch], np.int64)
  depth, lat = 3, (4, 2, 2)  # paths of up to 3 nodes, latents (C, R, R)
  lengths = [3, 2, 3, 3][:batch]
  ids = np.zeros((batch, depth), np.float32)
  latents = rng.normal(0, 1, (batch, depth) + lat).astype(np.float32)
  mask = np.zeros((batch, depth), np.float32)
  for b, n in enumerate(lengths):
    ids[b, :n] = [0, 2, 5][:n] if b % 2 else [0, 1, 3][:n]
    mask[b, :n] = 1
  z = [
    [(torch.tensor([ids[b, d]]), torch.from_numpy(latents[b, d])) for d in range(lengths[b])]
    for b in range(batch)
  ]
  outputs = {}
  with torch.no_grad():
    for which in ("online", "target"):
      net = DDPMNet(unet, beta_1=m["beta1"], beta_2=m["beta2"], T=m["n_timesteps"])
      net.load_state_dict(
        {k[len(which) + 9 :]: v for k, v in state.items() if k.startswith(which + "_network.")}
      )
      net.eval()
      eps = net.decoder(
        torch.from_numpy(x_t), torch.from_numpy(steps), low_res=torch.from_numpy(image), z=z
      )
      outputs[which] = eps.numpy().transpose(0, 2, 3, 1)
  out.update(
    ddpm_x_t=x_t.transpose(0, 2, 3, 1),
    ddpm_image=image.transpose(0, 2, 3, 1),
    ddpm_t=steps,
    ddpm_ids=ids,
    ddpm_latents=latents,
    ddpm_mask=mask,
    ddpm_eps_online=outputs["online"],
    ddpm_eps_target=outputs["target"],
  )


class Hyper:
  """Stands for the objects Lightning pickles into ``hyper_parameters``."""


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--reference", required=True, help="checkout of JoGo175/TreeDiffusion")
  args = parser.parse_args()
  sys.path.insert(0, os.path.abspath(args.reference))
  stub_modules()
  mean_samples()
  torch.set_grad_enabled(False)
  rng = np.random.default_rng(1)
  out: dict[str, np.ndarray] = {}
  cnn1 = treevae_case("cnn1", CNN1, rng, 4, out)
  treevae_case("cnn2", CNN2, rng, 4, out)
  ddpm_case(cnn1, rng, 4, out)
  np.savez(os.path.join(OUT, "reference_import.npz"), **out)
  configs = {
    "cnn1": {"training": CNN1},
    "cnn2": {"training": CNN2},
    "ddpm": {"training": CNN1, "ddpm": DDPM},
  }
  with open(os.path.join(OUT, "reference_import.json"), "w") as f:
    json.dump(configs, f, indent=1)
  for name in sorted(os.listdir(OUT)):
    if name.startswith("reference_"):
      print(name, os.path.getsize(os.path.join(OUT, name)))


if __name__ == "__main__":
  main()
