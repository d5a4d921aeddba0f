"""Stage 1: the importance-sampled test log-likelihood (:mod:`tree_diffusion.eval.likelihood`),
with ``eval.ll_samples`` samples per image in batches of ``eval.ll_batch_size``."""

from __future__ import annotations

import jax

from tree_diffusion.eval.likelihood import LogLikelihood
from tree_diffusion.eval.metrics._common import Row

STAGE = "stage1"
SETTINGS = ("ll_samples", "ll_batch_size", "seed")


def compute(ctx) -> dict:
  s = ctx.settings
  ll = LogLikelihood(ctx.model, ctx.tree, s.ll_samples, s.ll_batch_size, ctx.evaluator.mesh)
  key = jax.random.fold_in(jax.random.key(s.seed), 1)
  out = ll.run(ctx.variables, ctx.test, key, log=ctx.evaluator.log)
  ctx.evaluator.log(
    f"stage 1: test log-likelihood {out['log_likelihood']:.2f} ({s.ll_samples} importance samples)"
  )
  return out


def rows(stage1: dict, step) -> list[Row]:
  return [
    Row("test_log_likelihood", (stage1.get("log_likelihood") or {}).get("log_likelihood"), step)
  ]


def columns(thresholds) -> list[str]:
  return ["test_log_likelihood"]
