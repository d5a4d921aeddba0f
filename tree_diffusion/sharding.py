"""Mesh and shardings: data parallelism over a 2-axis mesh ``("replica", "data")``, params replicated.

The batch is split over *both* axes (``P(("replica", "data"))``); parameters and optimiser state
are replicated. The two axes only say where the devices are: ``"replica"`` runs across processes
(hosts, slow links between them) and ``"data"`` over the devices of one process, so each process
holds one contiguous block of every global batch and can feed it from its own rows of the data
(:func:`process_rows`, :func:`put_batch` with ``jax.make_array_from_process_local_data``). On one
process the mesh is ``(1, devices)``, the same computation as a 1-D data-parallel mesh.

Sampling and evaluation, where every process holds the whole input (sample ids, test images),
use :func:`put_global` (each process transfers its rows of the global batch) and :func:`to_host`
(the output gathered onto every process).
"""

from __future__ import annotations

import collections
from typing import Iterable, Iterator

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from tree_diffusion.errors import ConfigError

AXES = ("replica", "data")


def make_mesh(num_devices: int | None = None, replicas: int | None = None) -> jax.sharding.Mesh:
  """The ``("replica", "data")`` mesh over the first ``num_devices`` devices (default: all).

  Args:
    num_devices: devices to use (a divisor of the device count; default all).
    replicas: size of the ``"replica"`` axis (default: the number of processes when all devices
      are used, so that each process's devices form one row; else 1).
  """
  check_processes()
  n = num_devices or jax.device_count()
  r = replicas or (jax.process_count() if n == jax.device_count() else 1)
  if n % r:
    raise ValueError(f"{n} devices cannot form {r} replica rows")
  axis_types = (AxisType.Auto,) * 2
  if jax.process_count() > 1 and r == jax.process_count() and n == jax.device_count():
    # One row per process: its devices hold a contiguous block of every batch.
    devices = mesh_utils.create_hybrid_device_mesh((1, n // r), (r, 1), process_is_granule=True)
    return jax.sharding.Mesh(devices, AXES, axis_types=axis_types)
  return jax.make_mesh((r, n // r), AXES, axis_types=axis_types, devices=jax.devices()[:n])


def check_processes() -> None:
  """Every process of a multi-process job must have as many devices as the others: each one feeds
  the same share of every batch.

  Raises:
    ConfigError: the processes' local device counts differ, naming them.
  """
  counts = collections.Counter(d.process_index for d in jax.devices())
  if len(set(counts.values())) > 1:
    listed = ", ".join(f"process {p}: {n}" for p, n in sorted(counts.items()))
    raise ConfigError(
      f"the processes of this job have different numbers of devices ({listed}); "
      f"every process must have the same number (start one process per host "
      f"with all its accelerators, or set CUDA_VISIBLE_DEVICES to "
      f"{min(counts.values())} devices on every host)"
    )


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree, mesh):
  """``tree`` (arrays, keys, numpy) on every device of the mesh, replicated.

  With several processes every process must pass the same values; arrays committed to one local
  device go through the host first (``device_put`` cannot move them to other processes' devices).
  """
  rep = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, rep)

  def put(a):
    if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(a)), impl=jax.random.key_impl(a))
    if isinstance(a, jax.Array) and a.sharding == rep:
      return a
    return jax.device_put(np.asarray(a), rep)

  return jax.tree_util.tree_map(put, tree)


def batch_spec(mesh, *leading) -> P:
  """A partition spec splitting the axis after ``leading`` (usually none) over every mesh axis."""
  return P(*leading, tuple(mesh.axis_names))


def data_sharded(mesh) -> NamedSharding:
  """The leading (batch) axis split over every mesh axis."""
  return NamedSharding(mesh, batch_spec(mesh))


def check_batch_size(batch_size: int, mesh, setting: str = "stage1.batch_size") -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ConfigError(
      f"batch size {batch_size} is not divisible by the {n} devices of the mesh; "
      f"use a multiple of {n} (e.g. --config.{setting}={batch_size // n * n or n})"
    )


def process_rows(mesh, global_batch: int) -> slice:
  """The rows of a ``global_batch`` this process feeds (one contiguous block)."""
  index_map = data_sharded(mesh).addressable_devices_indices_map((global_batch,))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [global_batch if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  lo, hi = min(starts), max(stops)
  if sum(b - a for a, b in set(zip(starts, stops))) != hi - lo:
    raise ValueError(
      f"this process's devices do not hold one contiguous block of the batch "
      f"({sorted(set(zip(starts, stops)))}); build the mesh with make_mesh()"
    )
  return slice(lo, hi)


def put_batch(batch: dict, mesh, global_batch: int | None = None) -> dict:
  """Moves this process's rows of a batch onto the mesh as global arrays split over the batch axis.

  ``batch`` holds host arrays with this process's rows (:func:`process_rows`); on one process
  that is the whole batch. ``global_batch`` defaults to ``rows × processes``.
  """
  sharding = data_sharded(mesh)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    n = global_batch or v.shape[0] * jax.process_count()
    out[k] = jax.make_array_from_process_local_data(sharding, v, (n,) + v.shape[1:])
  return out


def put_global(arrays, mesh):
  """Host arrays that hold a *whole* global batch (the same values on every process) as global
  arrays split over the batch axis; each process transfers only its own rows
  (:func:`process_rows`). On one process this is ``device_put`` onto :func:`data_sharded`."""
  sharding = data_sharded(mesh)

  def put(a):
    a = np.asarray(a)
    return jax.make_array_from_process_local_data(
      sharding, a[process_rows(mesh, a.shape[0])], a.shape
    )

  return jax.tree_util.tree_map(put, arrays)


def to_host(tree):
  """Host (numpy) copies of device arrays; arrays that span several processes are gathered, so
  that every process gets the whole array (a collective: every process must call it)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  def get(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return multihost_utils.process_allgather(a, tiled=True)
    return np.asarray(a)

  return jax.tree_util.tree_map(get, tree)


def prefetch(batches: Iterable[dict], mesh, global_batch: int, size: int = 2) -> Iterator[dict]:
  """:func:`put_batch` over an iterator of host batches, keeping ``size`` batches in flight.

  Transfers are asynchronous: while the device runs step ``i``, batches ``i+1 … i+size`` are
  already being copied, so a step never waits for its input.
  """
  queue = collections.deque()
  for batch in batches:
    queue.append(put_batch(batch, mesh, global_batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
