"""Models trained by the reference PyTorch code, imported without torch.

The files in tests/data were written once by scripts/reference_import_parity.py with torch and the
reference's own classes: two TreeVAE state dicts (a pruned cnn1 tree whose pass-through node keeps
its only child on the right, a contrastive cnn2), a Lightning-layout DDPM checkpoint, and the
reference's outputs on fixed inputs. Here they are read, converted and run by this package.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from configs import common
from launchers import ROOT, run
from tree_diffusion import torch_files
from tree_diffusion.diffusion import reference as ddpm_ref
from tree_diffusion.diffusion.conditioning import make_denoiser
from tree_diffusion.errors import ConfigError
from tree_diffusion.tree import Tree
from tree_diffusion.treevae import losses
from tree_diffusion.treevae import reference as tvae_ref
from tree_diffusion.treevae.step import make_model

DATA = os.path.join(ROOT, "tests", "data")
OUTPUTS = np.load(os.path.join(DATA, "reference_import.npz"))
with open(os.path.join(DATA, "reference_import.json")) as _f:
  CONFIGS = json.load(_f)


def _config(reference: dict, ddpm: bool = False):
  c = common.base()
  updates = tvae_ref.config_updates(reference)
  if ddpm:
    updates.update(ddpm_ref.config_updates(reference))
  return tvae_ref.apply_updates(c, updates)


def _treevae(name):
  model = make_model(_config(CONFIGS[name]))
  state = torch_files.read_torch_tensors(os.path.join(DATA, f"reference_{name}.pt"))
  variables, tree = tvae_ref.variables_from_state_dict(model, state)
  return model, variables, tree


@pytest.mark.parametrize("name", ["cnn1", "cnn2"])
def test_treevae_computes_what_the_reference_computed(name, monkeypatch):
  model, variables, tree = _treevae(name)
  if name == "cnn1":  # breadth-first positions 0..5; position 2 lost its left leaf to pruning
    assert tree == Tree((0, 1, 2, 3, 4, 5))
    assert tree.passthrough_nodes == (2,) and tree.leaves == (3, 4, 5)
  else:
    assert model.contrastive and "proj_0" in variables["params"]
  # The reference's pass was run with every latent sample replaced by its mean.
  monkeypatch.setattr(losses, "sample_gaussian", lambda key, mu, var: mu)
  x = jnp.asarray(OUTPUTS[f"{name}_x"])
  # One compiled program (the eager pass dispatches every small op on its own: 4x slower).
  apply = lambda v, x: model.apply(v, tree, x, jax.random.key(0), train=False, return_recon=True)
  out, _ = jax.jit(apply)(variables, x)
  np.testing.assert_allclose(out["leaf_probs"], OUTPUTS[f"{name}_p_c_z"], atol=1e-6)
  np.testing.assert_allclose(out["recon"], OUTPUTS[f"{name}_recon"], atol=1e-5)
  for ours, theirs in [("rec", "rec_loss"), ("kl_root", "kl_root"), ("kl_nodes", "kl_nodes")]:
    np.testing.assert_allclose(np.mean(out[ours]), OUTPUTS[f"{name}_{theirs}"], rtol=1e-5)
  np.testing.assert_allclose(
    np.mean(out["kl_decisions"]), OUTPUTS[f"{name}_kl_decisions"], rtol=1e-4, atol=1e-8
  )


def _ddpm_inputs():
  lat = OUTPUTS["ddpm_latents"]  # [B, D, C, R, R], channel-first as the reference reads them
  b, d = lat.shape[:2]
  cond = dict(
    image=jnp.asarray(OUTPUTS["ddpm_image"]),
    latents=jnp.asarray(lat.transpose(0, 1, 3, 4, 2).reshape(b, d, -1)),
    ids=jnp.asarray(OUTPUTS["ddpm_ids"]),
    mask=jnp.asarray(OUTPUTS["ddpm_mask"]),
  )
  return jnp.asarray(OUTPUTS["ddpm_x_t"]), jnp.asarray(OUTPUTS["ddpm_t"], jnp.int32), cond


def test_unet_predicts_the_noise_the_reference_predicted():
  config = _config(CONFIGS["ddpm"], ddpm=True)
  c = config.diffusion
  assert c.conditioning == "image+path" and tuple(c.unet.ch_mults) == (1, 1)
  denoiser = make_denoiser(c.conditioning, c.unet)
  x, t, cond = _ddpm_inputs()
  template = jax.eval_shape(
    lambda: denoiser.init({"params": jax.random.key(0)}, x, t, cond, train=False)
  )["params"]
  state, scalars = torch_files.read_torch_checkpoint(os.path.join(DATA, "reference_ddpm.ckpt"))
  assert scalars["global_step"] == 1234 and scalars["epoch"] == 7
  weights = {k.removeprefix("state_dict."): v for k, v in state.items()}
  ddpm_ref.check_schedule(weights, c.T, c.beta_1, c.beta_T)
  apply = jax.jit(lambda p: denoiser.apply({"params": p}, x, t, cond, train=False))
  for network in ("online", "target"):
    params = ddpm_ref.params_from_state_dict(
      template, weights, f"{network}_network.decoder.", denoiser.conditioning, c.unet, (2, 2, 4)
    )
    np.testing.assert_allclose(apply(params), OUTPUTS[f"ddpm_eps_{network}"], atol=2e-5)


def test_launcher_writes_a_run_that_loads(tmp_path):
  from tree_diffusion.diffusion.checkpoints import Stage2Checkpoints
  from tree_diffusion.diffusion.state import StepConfig, abstract_state
  from tree_diffusion.diffusion.trained import read_run_config
  from tree_diffusion.runs import RunDir
  from tree_diffusion.treevae.export import load_treevae

  yml = tmp_path / "mnist.yml"
  yml.write_text(yaml.safe_dump(CONFIGS["ddpm"]))
  workdir = tmp_path / "run"
  args = [
    "--config=configs/demo.py",
    f"--workdir={workdir}",
    f"--reference_config={yml}",
    f"--treevae_weights={os.path.join(DATA, 'reference_cnn1.pt')}",
    f"--ddpm_checkpoint={os.path.join(DATA, 'reference_ddpm.ckpt')}",
  ]
  proc = run(*args, script="import_reference.py")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "(step 1234)" in proc.stdout
  # Stage 1: the export holds the converted variables and tree.
  model, variables, tree = _treevae("cnn1")
  got_model, got_vars, got_tree = load_treevae(RunDir(str(workdir)).export)[:3]
  assert got_tree == tree and got_model.to_dict() == model.to_dict()
  for a, b in zip(jax.tree_util.tree_leaves(got_vars), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(a, b)
  # Stage 2: step 1234, the online network as params, its EMA copy (one bias + 1) as EMA.
  config = read_run_config(str(workdir))
  c = config.diffusion
  denoiser = make_denoiser(c.conditioning, c.unet)
  abstract = abstract_state(denoiser, StepConfig.from_config(c), model, tree)
  ckpts = Stage2Checkpoints(RunDir(str(workdir)).stage2_checkpoints, read_only=True)
  step, state, meta = ckpts.restore(abstract)
  ckpts.close()
  assert step == 1234 and meta["imported_from"]["ddpm_checkpoint"].endswith("reference_ddpm.ckpt")
  bias = lambda p: np.asarray(p["UNet_0"]["Dense_0"]["bias"])
  np.testing.assert_allclose(bias(state.ema_params), bias(state.params) + 1.0, rtol=1e-6)
  # A second import into the same directory is refused in one line.
  proc = run(*args, script="import_reference.py")
  assert proc.returncode != 0 and "import into a new --workdir" in proc.stderr


def test_refusals_name_the_setting():
  cnn2 = CONFIGS["cnn2"]["training"]
  with pytest.raises(ConfigError, match="dim_mod_conv is False"):
    tvae_ref.config_updates({"training": dict(cnn2, dim_mod_conv=False)})
  with pytest.raises(ConfigError, match="spectral_norm"):
    tvae_ref.config_updates({"training": dict(cnn2, spectral_norm=True)})
  with pytest.raises(ConfigError, match="no training.encoder"):
    tvae_ref.config_updates({"training": {}})
  with pytest.raises(ConfigError, match="no ddpm.model"):
    ddpm_ref.config_updates({"training": cnn2})
  # Weights of another architecture: the first mismatching array is named.
  wrong = {"training": dict(CONFIGS["cnn1"]["training"], latent_channels=[8, 8, 8])}
  state = torch_files.read_torch_tensors(os.path.join(DATA, "reference_cnn1.pt"))
  with pytest.raises(ConfigError, match=r"has shape .* pass the YAML config"):
    tvae_ref.variables_from_state_dict(make_model(_config(wrong)), state)
  # A state dict that is no TreeVAE's.
  with pytest.raises(ConfigError, match="not a reference TreeVAE"):
    tvae_ref.variables_from_state_dict(make_model(_config(CONFIGS["cnn1"])), {"w": np.zeros(1)})
  # The Lightning checkpoint pickles an object of the script's own class: refused by the strict
  # reader, read past by the checkpoint reader.
  with pytest.raises(torch_files.TorchFileError, match="unsupported object __main__.Hyper"):
    torch_files.read_torch_tensors(os.path.join(DATA, "reference_ddpm.ckpt"))


def test_a_unet_of_other_latents_is_refused_with_the_key():
  config = _config(CONFIGS["ddpm"], ddpm=True)
  c = config.diffusion
  denoiser = make_denoiser(c.conditioning, c.unet)
  x, t, cond = _ddpm_inputs()
  cond = dict(cond, latents=jnp.zeros(cond["latents"].shape[:2] + (32,)))  # latents 2x2x8
  template = jax.eval_shape(
    lambda: denoiser.init({"params": jax.random.key(0)}, x, t, cond, train=False)
  )["params"]
  state, _ = torch_files.read_torch_checkpoint(os.path.join(DATA, "reference_ddpm.ckpt"))
  weights = {k.removeprefix("state_dict."): v for k, v in state.items()}
  with pytest.raises(ConfigError, match=r"proj_latent\.0\.weight has shape \(16, 128\)"):
    ddpm_ref.params_from_state_dict(
      template, weights, "online_network.decoder.", denoiser.conditioning, c.unet, (2, 2, 8)
    )
