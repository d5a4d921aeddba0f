"""StopRequest: the first signal asks for a checkpoint-and-stop, the second exits at once."""

import os
import signal
import subprocess
import sys

from tree_diffusion import preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = """
import os, signal, time
from tree_diffusion import preemption
with preemption.StopRequest() as stop:
  assert not stop.requested()
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(0.2)
  assert stop.requested() and stop.signal_name == "SIGTERM"
  print("first signal: stop requested", flush=True)
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(2)
print("not reached", flush=True)
"""


def test_second_signal_exits_at_once():
  r = subprocess.run(
    [sys.executable, "-c", _SCRIPT],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=ROOT),
  )
  assert r.returncode == 128 + signal.SIGINT, r.stderr[-2000:]
  assert r.stdout == "first signal: stop requested\n"
  assert "SIGTERM received: finishing the current step" in r.stderr
  assert "second SIGINT: exiting now" in r.stderr


def test_handlers_are_restored_and_a_request_without_signals():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.StopRequest() as stop:
    assert signal.getsignal(signal.SIGTERM) != before
    assert not stop.requested()
    stop.request()
    assert stop.requested() and stop.signal_name == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) == before
  assert not preemption.never().requested()
