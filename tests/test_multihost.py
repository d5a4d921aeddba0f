"""Multi-host data parallelism on one machine: two processes joined by ``jax.distributed``."""

import json
import os
import socket
import subprocess
import sys

import pytest

from test_multidevice import ROOT, TRAJECTORY, XLA_FAST, _check_trajectories


@pytest.mark.slow
def test_two_processes_over_loopback_match_1_device():
  """Two processes x 4 CPU devices joined by jax.distributed (gloo on 127.0.0.1), each feeding its
  own rows of every batch: the same 5-step stage-1 trajectory as one device (stage 2 on the same
  mesh in one process: tests/test_multidevice.py)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {XLA_FAST}")
  init = ("import jax\n"
          "jax.config.update('jax_cpu_collectives_implementation', 'gloo')\n"
          f"jax.distributed.initialize('127.0.0.1:{port}', num_processes=2, process_id=PID)\n"
          "STAGE = 1\n")
  procs = [subprocess.Popen([sys.executable, "-c", init.replace("PID", str(i)) + TRAJECTORY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT) for i in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  res = json.loads(outs[0][0].strip().splitlines()[-1])
  assert res["devices"] == 8
  _check_trajectories(res)
