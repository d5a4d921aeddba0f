"""What the end-to-end and error tests share: running the launchers as subprocesses, tiny
configs, a folder of images, comparing trained parameters bit for bit."""

import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(script):
  """The command line that runs ``launch/<script>`` as the README does: ``python -m launch.NAME``
  from the repository root (the cwd every launcher subprocess here gets)."""
  return [sys.executable, "-m", "launch." + script.removesuffix(".py")]


def run(*args, timeout=600, script="train_treevae.py", env=None):
  """Runs ``launch/<script>`` with ``args``; returns the ``CompletedProcess`` (text output)."""
  env = dict(os.environ, **(env or {}))
  return subprocess.run(
    [*command(script), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
  )


# File names a folder of a user's may hold: spaces, non-ASCII, CSV and HTML special characters.
ODD_NAMES = (
  'a b.png',
  'ünïcødé 字.png',
  'comma,"quote".png',
  '<img src=x onerror=alert(1)> & co.png',
)


def write_image_folder(folder, n=64, odd_names=False):
  """``n`` unlabelled 28x28 PNGs (real digits of mnist_5k's test split) in one flat folder; with
  ``odd_names`` the first ones are named :data:`ODD_NAMES`."""
  from PIL import Image
  from configs import demo
  from tree_diffusion import data

  images = data.load_arrays(demo.get_config().data, "test").images[:n, :, :, 0]
  folder.mkdir()
  for i, im in enumerate(images):
    name = ODD_NAMES[i] if odd_names and i < len(ODD_NAMES) else f"img_{i:03d}.png"
    Image.fromarray(im).save(folder / name)


def run_with_signals(*args, script, signals, timeout=600):
  """Runs a launcher; ``signals`` is a list of ``(text, signal[, delay_s])``: each signal is sent
  (``delay_s`` seconds) after a stderr line contains its text, in order. Returns ``(exit code,
  stderr)``."""
  p = subprocess.Popen(
    [*command(script), *args],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    cwd=ROOT,
  )
  watchdog = threading.Timer(timeout, p.kill)
  watchdog.start()
  lines, todo = [], list(signals)
  try:
    for line in p.stderr:
      lines.append(line)
      if todo and todo[0][0] in line:
        _, sig, *delay = todo.pop(0)
        time.sleep(delay[0] if delay else 0.0)
        p.send_signal(sig)
    rc = p.wait()
  finally:
    watchdog.cancel()
  assert not todo, f"{script} never logged {todo[0][0]!r}; stderr:\n{''.join(lines)[-3000:]}"
  return rc, "".join(lines)


def tiny_config(**overrides):
  """``configs/demo.py:tiny`` with ``section__field=value`` overrides."""
  from configs import demo

  c = demo.get_config("tiny")
  for key, value in overrides.items():
    section, field = key.split("__")
    c[section][field] = value
  return c


def assert_trees_equal(a, b):
  """Two pytrees of arrays are the same, structure and bits."""
  import jax
  import numpy as np

  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit for bit
