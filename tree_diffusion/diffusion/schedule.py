"""The DDPM noise schedule and its respacing.

Everything here is host-side NumPy in float64: cumulative products of ``1 − β`` lose digits in
float32 (the ``quad`` spacing even changes its last step from 800 to 799), so the tables are built
once in float64 and cast to float32 only when they become device constants of a sampler or a
train step.
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

SPACINGS = ("uniform", "quad")
# The samplers and DDPM posterior variances (diffusion.sampling.method / ddpm_variance).
METHODS = ("ddim", "ddpm")
DDPM_VARIANCES = ("fixedlarge", "fixedsmall")


def linear_betas(T: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02) -> np.ndarray:
  """``β_t = linspace(β_1, β_T, T)[t]`` for ``t = 0 … T−1`` (float64)."""
  if T < 1:
    raise ValueError(f"T must be >= 1, got {T}")
  if not 0.0 < beta_1 <= beta_T < 1.0:
    raise ValueError(f"need 0 < beta_1 <= beta_T < 1, got {beta_1}, {beta_T}")
  return np.linspace(beta_1, beta_T, T, dtype=np.float64)


def alpha_bars(betas: np.ndarray) -> np.ndarray:
  """``ᾱ_t = Π_{s≤t} (1 − β_s)`` (float64)."""
  return np.cumprod(1.0 - np.asarray(betas, np.float64))


def spaced_timesteps(T: int, n: int, kind: str = "quad") -> np.ndarray:
  """The ascending subset of ``0 … T−1`` that a respaced sampler visits.

  * ``uniform``: ``{0, s, 2s, …}`` with the smallest integer stride ``s`` that gives exactly ``n``
    steps (an ``n`` that no stride gives is an error).
  * ``quad``: ``int(v)`` for ``v`` in ``linspace(0, sqrt(0.8 T), n) ** 2`` (float64, truncated),
    duplicates removed. For ``T = 1000, n = 100`` that is 96 steps ending at 800: the chain never
    visits ``t > 0.8 T`` (inherited from DDIM; kept for fidelity).
  """
  for value, name in ((T, "T"), (n, "n")):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
      raise TypeError(f"spaced_timesteps needs integers 1 <= n <= T; got {name}={value!r}")
  if not 1 <= n <= T:
    raise ValueError(f"need 1 <= n <= T for spaced timesteps, got n={n}, T={T}")
  if kind == "uniform":
    # A stride s gives ceil(T / s) steps, which falls as s grows: the smallest stride giving at
    # most n steps is ceil(T / n), and it gives exactly n or no stride does.
    stride = -(-T // n)
    if -(-T // stride) == n:
      return np.arange(0, T, stride, dtype=np.int64)
    near = sorted({-(-T // s) for s in range(max(1, stride - 3), stride + 4)})
    raise ValueError(
      f"no integer stride gives {n} uniformly spaced steps out of {T}; "
      f"choose n among {near} or use 'quad' spacing"
    )
  if kind == "quad":
    v = np.linspace(0.0, np.sqrt(0.8 * T), n, dtype=np.float64) ** 2
    return np.unique(v.astype(np.int64))
  raise ValueError(f"unknown timestep spacing {kind!r}; expected one of {SPACINGS}")


@dataclasses.dataclass(frozen=True)
class Respaced:
  """Constants of the chain restricted to ``timesteps``, all float64 ``[S]``, ascending.

  Attributes:
    timesteps: the original step indices ``τ_k`` (the network is called with these).
    alpha_bar: ``ᾱ'_k = ᾱ_{τ_k}``.
    alpha_bar_prev: ``ᾱ'_{k−1}`` (1 for ``k = 0``).
    betas: ``β'_k = 1 − ᾱ'_k / ᾱ'_{k−1}``.
    posterior_variance: ``β̃'_k = β'_k (1 − ᾱ'_{k−1}) / (1 − ᾱ'_k)``.
    posterior_coef_x0: ``c1_k = β'_k sqrt(ᾱ'_{k−1}) / (1 − ᾱ'_k)`` (DDPM posterior mean).
    posterior_coef_xt: ``c2_k = sqrt(1 − β'_k) (1 − ᾱ'_{k−1}) / (1 − ᾱ'_k)``.
  """

  timesteps: np.ndarray
  alpha_bar: np.ndarray
  alpha_bar_prev: np.ndarray
  betas: np.ndarray
  posterior_variance: np.ndarray
  posterior_coef_x0: np.ndarray
  posterior_coef_xt: np.ndarray

  def __len__(self) -> int:
    return len(self.timesteps)

  def ddpm_variance(self, kind: str) -> np.ndarray:
    """Per-step variance of ancestral sampling.

    ``fixedlarge``: ``β'_k``, except ``k = 0`` which takes ``β̃'_1`` (the posterior variance of the
    next step; ``β̃'_0 = 0``). ``fixedsmall``: ``β̃'_k``, with ``k = 0`` clipped to ``β̃'_1`` inside
    the log as the reference does (the noise at ``k = 0`` is masked anyway).
    """
    if kind == "fixedlarge":
      v = self.betas.copy()
    elif kind == "fixedsmall":
      v = self.posterior_variance.copy()
    else:
      raise ValueError(f"unknown DDPM variance {kind!r}; expected 'fixedlarge' or 'fixedsmall'")
    if len(v) > 1:
      v[0] = self.posterior_variance[1]
    return v


def respace(alpha_bar: np.ndarray, timesteps: np.ndarray) -> Respaced:
  """Restricts the chain with cumulative products ``alpha_bar`` (``[T]``) to ``timesteps``."""
  ab = np.asarray(alpha_bar, np.float64)
  tau = np.asarray(timesteps, np.int64)
  if (
    tau.ndim != 1 or tau.size == 0 or np.any(np.diff(tau) <= 0) or tau[0] < 0 or tau[-1] >= len(ab)
  ):
    raise ValueError(f"timesteps must be strictly increasing in [0, {len(ab)}), got {tau}")
  a = ab[tau]
  a_prev = np.concatenate([[1.0], a[:-1]])
  betas = 1.0 - a / a_prev
  post_var = betas * (1.0 - a_prev) / (1.0 - a)
  c1 = betas * np.sqrt(a_prev) / (1.0 - a)
  c2 = np.sqrt(1.0 - betas) * (1.0 - a_prev) / (1.0 - a)
  return Respaced(
    timesteps=tau,
    alpha_bar=a,
    alpha_bar_prev=a_prev,
    betas=betas,
    posterior_variance=post_var,
    posterior_coef_x0=c1,
    posterior_coef_xt=c2,
  )
