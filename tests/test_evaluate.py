"""Evaluation plumbing: checkpoint selection, settings validation, the CSV rows and the report,
the histogram row of the tree figure."""

import json
import types

import numpy as np
import pytest

from configs import demo
from tree_diffusion.errors import ConfigError
from tree_diffusion.eval import evaluate, metrics, purity, report


def test_select_steps():
  assert evaluate.select_steps([1000, 500], "all") == [500, 1000]
  assert evaluate.select_steps([1000, 500], "latest") == [1000]
  assert evaluate.select_steps([1000, 500], "500") == [500]
  assert evaluate.select_steps([], "none") == []
  with pytest.raises(ConfigError, match=r"no stage-2 checkpoint\(s\) \[700\]; have \[500, 1000\]"):
    evaluate.select_steps([500, 1000], "500,700")
  with pytest.raises(ConfigError, match="no stage-2 checkpoints"):
    evaluate.select_steps([], "latest")
  with pytest.raises(ConfigError, match="comma-separated"):
    evaluate.select_steps([500], "newest")


def test_settings_from_config_and_bad_modes():
  config = demo.get_config("tiny")
  s = evaluate.Settings.from_config(config)
  assert s.modes == tuple(config.eval.modes) and s.num_samples == config.eval.num_samples
  assert evaluate.Settings.from_config(config, ["recons"]).key() != s.key()
  with pytest.raises(ConfigError, match="unknown mode.*sampel"):
    evaluate.Settings.from_config(config, ["sampel"])
  config.eval.ll_samples = 0
  with pytest.raises(ConfigError, match="ll_samples"):
    evaluate.Settings.from_config(config)


def _metrics():
  purity = lambda w, n: {"weighted_majority_fraction": w, "total_kept": n}
  return {
    "num_leaves": 3,
    "export": "/run/export",
    "settings": {"num_samples": 8, "purity_samples": 4},
    "stage1": {
      "clustering": {"nmi": 0.5, "accuracy": 0.6, "leaf_purity": 0.7, "dendrogram_purity": 0.4},
      "log_likelihood": {"log_likelihood": -100.0, "log_likelihood_stderr": 1.0, "num_samples": 2},
      "fid": {"gen": 30.0, "rec": 20.0, "num_rec": 8, "num_reference": 16},
    },
    "checkpoints": {
      "10": {
        "modes": {
          "sample": {"fid": 5.0},
          "recons": {"fid": 4.0},
          "sample_all_leaves": {
            "purity": {"thresholds": {"0.5": purity(0.8, 9), "0.9": purity(0.9, 3)}},
            "purity_treevae": {"thresholds": {"0.5": purity(0.6, 9), "0.9": purity(0.7, 3)}},
          },
        }
      },
      "2": {"modes": {"sample": {"fid": 7.0}}},
    },
  }


def test_csv_rows_and_report(tmp_path):
  rows = report.csv_rows(_metrics())
  assert [r["step"] for r in rows] == [2, 10]  # numeric order
  assert rows[1]["fid_gen"] == 5.0 and rows[1]["fid_rec"] == 4.0
  assert rows[1]["majority_p0.5"] == 0.8 and rows[1]["kept_p0.9"] == 3
  assert rows[0]["fid_rec"] is None and rows[0]["nmi"] == 0.5 and rows[0]["treevae_fid_gen"] == 30.0
  report.write_csv(str(tmp_path / "m.csv"), _metrics())
  lines = (tmp_path / "m.csv").read_text().splitlines()
  assert len(lines) == 3 and lines[0].split(",") == [
    "step", "fid_gen", "fid_rec", "majority_p0.5", "majority_p0.9", "kept_p0.5", "kept_p0.9",
    "treevae_majority_p0.5", "treevae_majority_p0.9", "treevae_fid_gen", "treevae_fid_rec", "nmi",
    "accuracy", "leaf_purity", "dendrogram_purity", "test_log_likelihood", "num_leaves",
  ]  # fmt: skip
  assert lines[2].split(",")[:8] == ["10", "5.0", "4.0", "0.8", "0.9", "9", "3", "0.6"]
  config = demo.get_config("tiny")
  config.diffusion.conditioning = "path"  # the paper's final model: its Table-1 row is marked
  report.write_report(str(tmp_path / "r.md"), _metrics(), config)
  text = (tmp_path / "r.md").read_text()
  assert "| 10 | 4.00 | 5.00 | 0.800 (9) | 0.900 (3) | 0.600 | 0.700 |" in text
  assert rows[1]["treevae_majority_p0.5"] == 0.6 and rows[0]["treevae_majority_p0.9"] is None
  assert "MNIST TreeDiffusion (this conditioning) | 1.5 ± 0.0 | 1.8 ± 0.1" in text
  config.data.name = "folder"
  report.write_report(str(tmp_path / "r2.md"), _metrics(), config)
  assert "No published numbers" in (tmp_path / "r2.md").read_text()


def test_thresholds_are_the_configured_ones(tmp_path):
  """The purity columns and the report's table follow classifier.thresholds, not 0.5 and 0.9."""
  m = _metrics()
  m["checkpoints"]["10"]["modes"]["sample_all_leaves"] = {
    "purity": {"thresholds": {"0.75": {"weighted_majority_fraction": 0.7, "total_kept": 5}}}
  }
  rows = report.csv_rows(m)
  assert rows[1]["majority_p0.75"] == 0.7 and rows[1]["kept_p0.75"] == 5
  assert "majority_p0.5" not in rows[1] and rows[0]["majority_p0.75"] is None
  config = demo.get_config("tiny")
  config.classifier.thresholds = (0.75,)
  report.write_report(str(tmp_path / "r.md"), m, config)
  text = (tmp_path / "r.md").read_text()
  assert "| step | FID (rec) | FID (gen) | majority fraction p≥0.75 (kept) | TreeVAE" in text
  assert "| 10 | 4.00 | 5.00 | 0.700 (5) | – |" in text


def test_metric_registry():
  """Each metric is a module found by its name: it declares a stage, the settings it reads (all
  of them fields of config.eval) and its columns; an unknown name is one line naming the flag."""
  names = metrics.available()
  assert {
    "fid",
    "purity",
    "treevae_fid",
    "clustering",
    "log_likelihood",
    "leaf_size_entropy",
  } <= set(names)
  config = demo.get_config("tiny")
  assert set(config.eval.metrics) <= set(names)
  for module in metrics.load(names):
    assert module.STAGE in metrics.STAGES
    assert set(module.SETTINGS) <= set(config.eval), module.__name__
    assert module.columns((0.5,)), module.__name__
  config.eval.metrics = ("fid", "nmi")
  with pytest.raises(ConfigError, match=r"unknown metric\(s\) nmi; set --config.eval.metrics"):
    evaluate.Settings.from_config(config)


def test_leaf_size_entropy_by_hand():
  """Test images in leaves 0, 0, 1, 2 of 4: p = (1/2, 1/4, 1/4, 0), H = 1.5 ln 2 nats, / ln 4."""
  from tree_diffusion.eval.metrics import leaf_size_entropy

  probs = np.eye(4)[[0, 0, 1, 2]] * 0.7 + 0.075
  out = leaf_size_entropy.compute(types.SimpleNamespace(test_probs=probs))
  assert out["entropy"] == pytest.approx(1.5 * np.log(2), abs=1e-12)
  assert out["normalized"] == pytest.approx(0.75, abs=1e-12) and out["num_leaves"] == 4
  one = leaf_size_entropy.compute(types.SimpleNamespace(test_probs=np.ones((3, 1))))
  assert one["normalized"] == 0.0 and one["entropy"] == 0.0
  rows = metrics.rows({"num_leaves": 4, "settings": {"metrics": ["leaf_size_entropy"]},
                       "stage1": {"leaf_size_entropy": out}})  # fmt: skip
  assert [(r.name, r.value, r.step) for r in rows] == [
    ("leaf_size_entropy", out["normalized"], None),
    ("num_leaves", 4, None),
  ]


def test_faithfulness_by_hand():
  """Two draws through three leaves, two classes. Leaf 0: the draws reach it with p 0.75 and
  0.25 and are classified 0 and 1, so g = (0.75, 0.25); its test images have labels 0, 0, 1, so
  r = (2/3, 1/3) and TV = 1/12. Leaf 1: g = (0, 1) = r, TV 0. Leaf 2 has no test image (weight
  0); the unlabelled test image is left out. Weighted: (3 · 1/12 + 1 · 0) / 4 = 1/16."""
  from tree_diffusion.eval.metrics import faithfulness as f

  probs = np.array([[0.75, 0.25, 0.5], [0.25, 0.75, 0.5]])
  predicted = np.array([[0, 1, 0], [1, 1, 0]])
  leaves, labels = np.array([0, 0, 0, 1, 2]), np.array([0, 0, 1, 1, -1])
  value, per_leaf, n = f.weighted_tv(probs, predicted, leaves, labels, 2)
  assert value == pytest.approx(1 / 16, abs=1e-12)
  assert per_leaf[0] == pytest.approx(1 / 12, abs=1e-12) and per_leaf[1] == 0.0
  assert per_leaf[2] is None and list(n) == [3, 1, 0]
  out = f.faithfulness(probs, predicted, leaves, labels, 2, seed=0, num_bootstrap=200)
  assert out["weighted_tv"] == value and out["num_bootstrap"] == 200
  assert [leaf["weight"] for leaf in out["leaves"]] == [0.75, 0.25, 0.0]
  lo, hi = out["interval_95"]
  assert 0.0 <= lo <= hi <= 1.0
  again = f.faithfulness(probs, predicted, leaves, labels, 2, seed=0, num_bootstrap=200)
  assert again["interval_95"] == out["interval_95"]  # seeded
  # Identical mixes: 0, whatever the weights; disjoint classes: 1.
  same = f.weighted_tv(np.ones((2, 1)), np.array([[0], [1]]), np.array([0, 0]), np.array([0, 1]), 2)
  assert same[0] == 0.0
  apart = f.weighted_tv(np.ones((2, 1)), np.zeros((2, 1), int), np.array([0]), np.array([1]), 2)
  assert apart[0] == 1.0


def _evaluation(nmi, fid_gen, steps, purity=None):
  """A run's metrics.json with stage-1 NMI and, per step, FID(gen) (+ purity at 0.5)."""
  checkpoints = {}
  for step, fid in zip(steps, fid_gen):
    modes = {"sample": {"fid": fid}}
    if purity is not None:
      thresholds = {"0.5": {"weighted_majority_fraction": purity, "total_kept": 7}}
      modes["sample_all_leaves"] = {"purity": {"thresholds": thresholds}}
    checkpoints[str(step)] = {"modes": modes}
  return {"num_leaves": 4, "stage1": {"clustering": {"nmi": nmi}}, "checkpoints": checkpoints}


def test_mean_and_std_across_runs_match_numpy(tmp_path):
  """Three runs: each run's latest checkpoint (not its earlier ones), stage 1 once per run, the
  sample standard deviation; a run without a value is left out of that column."""
  from tree_diffusion.eval import across_runs

  evaluations = {
    "runs/s0": _evaluation(0.61, [90.0, 50.0], [500, 1000], purity=0.7),
    "runs/s1": _evaluation(0.66, [47.5], [1000], purity=0.8),
    "runs/s2": _evaluation(0.58, [60.0, 55.25], [100, 2000]),
  }
  result = across_runs.aggregate(evaluations)
  cols = result["columns"]
  for column, values in (
    ("nmi", [0.61, 0.66, 0.58]),
    ("fid_gen", [50.0, 47.5, 55.25]),
    ("majority_p0.5", [0.7, 0.8]),
    ("num_leaves", [4, 4, 4]),
  ):
    assert cols[column]["n"] == len(values)
    assert cols[column]["mean"] == pytest.approx(np.mean(values), rel=1e-12)
    assert cols[column]["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-12, abs=1e-15)
  assert result["steps"] == {"runs/s0": 1000, "runs/s1": 1000, "runs/s2": 2000}
  assert cols["fid_rec"]["n"] == 0 and cols["fid_rec"]["mean"] is None
  across_runs.write(str(tmp_path), result, "mnist", "path")
  table = (tmp_path / "metrics.csv").read_text().splitlines()
  assert table[0] == "column,mean,std,n,runs/s0,runs/s1,runs/s2"
  row = next(line.split(",") for line in table if line.startswith("fid_gen,"))
  assert float(row[1]) == pytest.approx(np.mean([50.0, 47.5, 55.25]), rel=1e-12)
  assert [float(v) for v in row[4:]] == [50.0, 47.5, 55.25]
  text = (tmp_path / "report.md").read_text()
  assert (
    f"| fid_gen | {np.mean([50.0, 47.5, 55.25]):.3f} ± {np.std([50.0, 47.5, 55.25], ddof=1):.3f} | 3 |"
    in text
  )
  assert "MNIST TreeDiffusion (this conditioning) | 1.5 ± 0.0 | 1.8 ± 0.1" in text
  assert json.loads((tmp_path / "metrics.json").read_text())["columns"]["nmi"]["n"] == 3


def test_run_patterns_expand_to_directories(tmp_path, monkeypatch):
  from launch import common

  for name in ("seed_2", "seed_10", "other"):
    (tmp_path / name).mkdir()
  (tmp_path / "seed_file").write_text("x")
  assert common.expand_runs([f"{tmp_path}/seed_*", "x"]) == [
    f"{tmp_path}/seed_10",
    f"{tmp_path}/seed_2",
    "x",
  ]
  monkeypatch.chdir(tmp_path)
  assert common.expand_runs(["seed_?"]) == ["seed_2"]
  with pytest.raises(ConfigError, match=r"--workdir=nothing\* matches no directory"):
    common.expand_runs(["nothing*"])


def test_histogram_images():
  img = purity.histogram_images([[0.25, 0.75], None], height=10, bar=2)
  assert img.shape == (2, 1, 10, 2 * 2 + 3, 3)
  col = lambda x: img[0, 0, :9, x]  # above the baseline
  blue, orange = (col(1) != 1).all(-1).sum(), (col(4) != 1).all(-1).sum()
  assert (blue, orange) == (round(0.25 * 8), round(0.75 * 8))
  assert np.allclose(img[0, 0, 8, 4], (0.95, 0.55, 0.1))  # majority class in orange
  assert np.all(img[1, 0, :9] == 1.0)  # nothing kept: blank


def test_run_summary_table(tmp_path):
  from tree_diffusion.eval import report

  write = lambda rel, obj: (
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True),
    (tmp_path / rel).write_text(json.dumps(obj)),
  )
  write(
    "stage1_metrics.json",
    {
      "test": {"num_leaves": 3, "nmi": 0.61234, "leaf_purity": 0.6},
      "kmeans_pixels": {"nmi": 0.48, "leaf_purity": 0.55},
      "wall_time_s": 200.0,
    },
  )
  write("diffusion/train_summary.json", {"wall_time_s": 301.0, "conditioning": "image+path"})
  write(
    "diffusion/samples/summary.json",
    {"modes": {"sample": {"wall_time_s": 10.0}, "recons": {"wall_time_s": 5.0}}},
  )
  m = _metrics()
  m["stage1"]["wall_time_s"] = 50.0
  m["checkpoints"]["10"]["wall_time_s"] = 70.0
  write("eval/metrics.json", m)
  text = report.summary_table(str(tmp_path), {"stage1": 230})
  rows = [line for line in text.splitlines() if line.startswith("| ")]
  assert rows[1] == "| k-means on pixels | 0.480 | 0.550 | – | – | – | – | – |"
  # The latest checkpoint (10, not 2); stage 1's time from `times`, the rest as recorded.
  assert (
    rows[2]
    == "| TreeVAE (3 leaves) | 0.612 | 0.600 | 30.0 | 20.0 | 0.600 (9 kept) | – | 3 min 50 s |"
  )
  assert rows[3] == (
    "| diffusion, image+path conditioning (step 10) | – | – | 5.0 | 4.0 | "
    "0.800 (9 kept) | – | 5 min 01 s |"
  )
  assert "sampling and figures 15 s, evaluation 2 min 00 s; 11 min 06 s in all." in text


def test_reference_pixel_rules():
  """eval.quantize / eval.treevae_pixels: ours rounds after clipping; the reference's PNG writer
  floors (D11); its TreeVAE FID casts x·255 to a byte without a clamp, so values out of range wrap
  around modulo 256 (D13)."""
  from tree_diffusion.diffusion import generate

  x = np.array([-0.01, 0.0, 0.5, 0.999, 1.0, 1.2], np.float32)
  assert generate.to_uint8(x).tolist() == [0, 0, 128, 255, 255, 255]
  assert generate.to_uint8(x, "floor").tolist() == [0, 0, 127, 254, 255, 255]
  assert generate.to_uint8(x, "wrap").tolist() == [254, 0, 127, 254, 255, 50]
  with pytest.raises(ValueError, match="rule must be one of"):
    generate.to_uint8(x, "ceil")


def test_reference_treevae_leaf_rule():
  """eval.treevae_leaf (D12): "argmax" decodes through the most probable leaf, as the reference's
  TreeVAE rows do; "draw" samples it from the leaf probabilities, as the diffusion modes do."""
  import jax

  from tree_diffusion.eval.metrics import treevae_fid

  probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.5, 0.5]] * 200, np.float32)
  key = jax.random.key(0)
  assert np.asarray(treevae_fid._leaf(probs, key, True)).tolist() == [1, 0, 0] * 200
  drawn = np.asarray(treevae_fid._leaf(probs, key, False))
  share = drawn.reshape(200, 3).mean(0)  # the fraction of leaf 1 per row kind
  assert abs(share[0] - 0.9) < 0.07 and abs(share[1] - 0.2) < 0.07 and abs(share[2] - 0.5) < 0.1


def test_reference_switches_are_checked():
  config = demo.get_config("tiny")
  s = evaluate.Settings.from_config(config)
  assert (s.quantize, s.treevae_leaf, s.treevae_pixels) == ("round", "draw", "clip")
  config.eval.treevae_leaf = "mode"
  with pytest.raises(ConfigError, match=r"eval.treevae_leaf must be one of draw, argmax"):
    evaluate.Settings.from_config(config)


def test_report_of_an_evaluation_without_fid(tmp_path):
  """An evaluation that computed only some metrics (here purity and faithfulness) still gets its
  report, with '–' where a metric was not computed."""
  faith = {"weighted_tv": 0.125, "interval_95": [0.1, 0.2]}
  m = {
    "num_leaves": 2,
    "settings": {"metrics": ["purity", "faithfulness"]},
    "checkpoints": {
      "7": {
        "modes": {
          "sample_all_leaves": {
            "purity": {"thresholds": {"0.5": {"weighted_majority_fraction": 0.5, "total_kept": 4}}},
            "faithfulness": faith,
            "faithfulness_treevae": dict(faith, weighted_tv=0.25),
          }
        }
      }
    },
  }
  config = demo.get_config("tiny")
  config.classifier.thresholds = (0.5,)
  report.write_report(str(tmp_path / "r.md"), m, config)
  text = (tmp_path / "r.md").read_text()
  assert "| 7 | – | – | 0.500 (4) | – | 0.125 [0.100, 0.200] | 0.250 [0.100, 0.200] |" in text
  assert report.csv_rows(m)[0]["faithfulness_tv"] == 0.125
