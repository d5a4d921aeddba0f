"""The pieces every training loop shares (tree_diffusion/loop.py), on a fake clock."""

import pytest

from tree_diffusion import loop, preemption
from tree_diffusion.errors import TrainingDivergedError


@pytest.fixture
def clock(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
  return now


def test_progress_leaves_the_compiling_window_out_of_the_rates(clock):
  # Resumed at step 10 of 50, 8 images per step.
  p = loop.Progress(50, 8, done=10)
  clock[0] += 20.0  # 5 steps in 20 s, compilation included
  assert p.report(15) == (2.0, 20.0 / 5 * 35)
  assert p.rates == [] and p.median_rate() is None
  clock[0] += 2.0  # 5 steps in 2 s
  assert p.report(20) == (20.0, 22.0 / 10 * 30)
  clock[0] += 4.0
  p.pause(3.0)  # 3 of those 4 s were an evaluation
  assert p.report(30) == (80.0, 23.0 / 20 * 20)
  assert p.rates == [20.0, 80.0] and p.median_rate() == 50.0


def test_a_window_can_start_after_work_that_is_not_training(clock):
  shared = [1.0]  # stage 1 shares one list across its phases
  p = loop.Progress(4, 2, rates=shared)
  clock[0] += 10.0
  p.report(2)  # first window: not kept
  clock[0] += 7.0  # figure, metrics: outside any window
  p.start_window(2)
  clock[0] += 1.0
  assert p.report(4) == (4.0, 0.0)
  assert shared == [1.0, 4.0]


def test_check_finite_names_the_place_the_last_good_checkpoint_and_the_fix():
  loop.check_finite(1.5, "x", "fix it")
  with pytest.raises(TrainingDivergedError) as e:
    loop.check_finite(float("nan"), "stage 9 at step 3", "Lower the lr.", last_good="checkpoint 2")
  assert str(e.value) == (
    "non-finite loss in stage 9 at step 3; nothing was saved after it, the "
    "last good one is checkpoint 2. Lower the lr."
  )
  with pytest.raises(TrainingDivergedError, match=r"^non-finite loss in the classifier\. Lower"):
    loop.check_finite(float("inf"), "the classifier", "Lower the lr.")


def test_checkpoint_if_due_saves_on_schedule_and_stops_after_saving():
  saved = []

  def save():
    saved.append(len(saved) + 1)
    return saved[-1]

  stop = preemption.never()
  for step in range(1, 8):
    loop.checkpoint_if_due(stop, step, 3, save, lambda n: f"at {n}")
  assert saved == [1, 2]  # steps 3 and 6
  loop.checkpoint_if_due(stop, 5, 0, save, lambda n: "")  # 0: only on a stop
  assert saved == [1, 2]
  stop = preemption.StopRequest()
  stop.request()
  with pytest.raises(preemption.Preempted, match="^stopped by SIGTERM at step 7; checkpoint 3$"):
    loop.checkpoint_if_due(stop, 7, 3, save, lambda n: f"at step 7; checkpoint {n}")
  assert saved == [1, 2, 3]
