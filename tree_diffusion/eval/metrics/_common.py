"""What the metric modules share: the :class:`Row` of the schema (see the package docstring), the
contexts a metric's ``compute`` receives, and reading nested ``metrics.json`` entries."""

from __future__ import annotations

import dataclasses
from typing import Any

from tree_diffusion.diffusion.generate import to_uint8
from tree_diffusion.eval.classifier import classify_all_leaves


@dataclasses.dataclass(frozen=True)
class Row:
  """One number of an evaluation (see the module docstring for the schema)."""

  name: str
  value: Any
  step: int | None = None
  run: str = ""
  leaf: int | None = None  # index in the tree's leaf order
  threshold: float | None = None

  @property
  def column(self) -> str:
    """Its ``metrics.csv`` column: the name, with ``_p<threshold>`` for a thresholded value."""
    return self.name if self.threshold is None else f"{self.name}_p{self.threshold:g}"


@dataclasses.dataclass(frozen=True)
class Stage1Context:
  """What a stage-1 metric sees: the export, the test split and its leaf probabilities."""

  evaluator: Any  # evaluate.Evaluator: settings, mesh, log, features(), reference_features()
  dataset: str  # config.data.name
  thresholds: tuple  # config.classifier.thresholds: p(leaf) thresholds of the purity metric
  workdir: str
  model: Any  # TreeVAE
  variables: Any
  tree: Any  # Tree
  test: Any  # data.Arrays
  test_probs: Any  # [N, K] leaf probabilities of the test images
  out_dir: str  # WORKDIR/eval, for figures

  @property
  def settings(self):
    return self.evaluator.settings

  def reference(self):
    """Inception features of the test split (cached per run and in memory)."""
    return self.evaluator.reference_features(self.workdir, self.dataset, "test", self.test)


@dataclasses.dataclass(frozen=True)
class SamplesContext(Stage1Context):
  """What a samples metric sees: a stage-1 context, one checkpoint, one mode's generations."""

  stage2: Any = None  # generate.Stage2 at this checkpoint
  mode: str = ""
  result: Any = None  # the sampler's outputs (image, leaf, leaf_probs, vae_image, ...)
  images: Any = None  # the generations as uint8 [N, H, W, C] (all-leaves modes: [N, K, ...])
  classifier: Any = None  # the purity classifier, or None
  cache: dict = dataclasses.field(default_factory=dict)  # what the metrics of one mode share

  def predictions(self, generator: str):
    """The purity classifier's class of every generation of an all-leaves mode, int ``[N, K]``:
    ``generator`` "diffusion" classifies :attr:`images`, "treevae" the TreeVAE's decodings of the
    same prior draws through the same leaves. Computed once per mode, for every metric."""
    if generator not in self.cache:
      images = (
        self.images
        if generator == "diffusion"
        else to_uint8(self.result["vae_image"], self.settings.quantize)
      )
      self.cache[generator] = classify_all_leaves(
        self.classifier, images, self.settings.batch_size, mesh=self.evaluator.mesh
      )[0]
    return self.cache[generator]


def get(d: Any, *path: str, default: Any = None) -> Any:
  """``d[path[0]][path[1]]...``, or ``default`` where a level is missing."""
  for p in path:
    if not isinstance(d, dict) or p not in d:
      return default
    d = d[p]
  return d


def per_leaf(name: str, groups, step) -> list[Row]:
  """Per-leaf rows of a :func:`~tree_diffusion.eval.fid.per_group_fid` result (one dict per leaf,
  in the tree's leaf order)."""
  return [Row(name, g.get("fid"), step, leaf=i) for i, g in enumerate(groups or ())]
