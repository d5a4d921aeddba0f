"""Mesh and shardings: data parallelism over one mesh axis ``"data"`` with replicated parameters."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh ``("data",)`` over the first ``num_devices`` devices (default: all)."""
  n = num_devices or jax.device_count()
  return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def check_batch_size(batch_size: int, mesh, setting: str = "stage1.batch_size") -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"batch size {batch_size} is not divisible by the {n} devices of the mesh; "
                     f"use a multiple of {n} (e.g. --config.{setting}={batch_size // n * n or n})")


def put_batch(batch: dict, mesh) -> dict:
  """Moves a host batch (numpy arrays, leading batch axis) onto the mesh, split over ``"data"``."""
  sharding = data_sharded(mesh)
  return {k: jax.device_put(np.asarray(v), sharding) for k, v in batch.items()}
