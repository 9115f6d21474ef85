"""Per-device code over all devices of all processes: pmap's semantics, compiled with jit + shard_map.

Device code is written for one device, with its collectives (`lax.pmean`, `lax.psum`) over the one axis
`AXIS` of a 1-D mesh of every device. What it takes and returns are global arrays of two kinds:

  REPLICATED (`P()`)   the train state, metrics, eval sums: every device holds the whole array;
  SPLIT (`P(AXIS)`)    batches: the leading axis is split over the devices, each device sees its slice.

`map_per_device` compiles such code one way for one process and for many: `jax.jit(jax.shard_map(...))`.
Host data enters through `put_replicated` (the same tree on every process) and `put_batch` (each process
its own part of the global batch); `to_host` reads a replicated tree back as NumPy on every process.
"""
import collections
from typing import Callable, Iterator, Optional, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from nfnets import cpu

AXIS = 'devices'                     # the one axis every collective reduces over
REPLICATED = PartitionSpec()         # the state: a whole copy on every device
SPLIT = PartitionSpec(AXIS)          # a batch: its leading axis split over the devices


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """A 1-D mesh over `devices` (default: every device of every process, each process's together, so a
  process's part of a batch is one contiguous slice of the global batch).

  A subset of the devices is only meaningful in a single-process run: with several processes every
  device must take part, or collectives would reduce over some processes only.
  """
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  elif jax.process_count() > 1 and len(devices) != jax.device_count():
    raise ValueError(f'A multi-process run maps over all {jax.device_count()} devices; got {len(devices)}')
  return jax.sharding.Mesh(np.array(list(devices)), (AXIS,))


def local_device_count(mesh: jax.sharding.Mesh) -> int:
  return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def map_per_device(fn: Callable, mesh: jax.sharding.Mesh, in_specs, out_specs,
                   donate_argnums: Sequence[int] = ()) -> Callable:
  """Compiles per-device `fn` over the mesh: each argument and output is REPLICATED or SPLIT as its spec
  (a prefix of its tree) says; donated arguments lend their buffers to the outputs.

  pmap's semantics (`check_vma=False`, as jax.pmap itself compiles): a value is per device until a
  collective combines it. With shard_map's varying-value tracking on, the gradient of a replicated param
  would instead be summed over the devices implicitly, so SAM's per-device ascent could not be written
  and `pmean` would no longer be the only place where gradients meet.
  """
  mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  return jax.jit(mapped, donate_argnums=tuple(donate_argnums))


def put_replicated(tree, mesh: jax.sharding.Mesh):
  """Global arrays holding a host tree (the same on every process) whole on every device.

  Never views of the caller's arrays, so a train step can update the donated state in place and the caller
  may reuse its arrays. `may_alias=False` alone does not ensure it on XLA:CPU, which places a 64-byte-aligned
  NumPy array without copying it (JAX 0.10): there each leaf is first copied on the host
  (`cpu.private_host_copy`), one at a time. An accelerator always copies host data to its own memory.
  """
  sharding = NamedSharding(mesh, REPLICATED)
  return jax.tree.map(lambda x: jax.device_put(cpu.private_host_copy(x), sharding, may_alias=False), tree)


def put_batch(local_tree, mesh: jax.sharding.Mesh):
  """Global arrays split over the devices along the leading axis, from this process's part of each
  (its contiguous slice of the global batch: `make_mesh` keeps each process's devices together)."""
  sharding = NamedSharding(mesh, SPLIT)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_tree)


def prefetch(batches: Iterator, mesh: jax.sharding.Mesh, size: int = 2) -> Iterator:
  """Yields each host batch already on the devices (`put_batch`), `size` batches ahead, so copies overlap
  compute."""
  if size < 1:
    raise ValueError(f'prefetch size must be >= 1, got {size}')
  queue = collections.deque()
  for batch in batches:
    queue.append(put_batch(batch, mesh))   # asynchronous
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def to_host(tree):
  """A replicated tree (or any fully addressable one) as NumPy arrays, on every process."""
  return jax.device_get(tree)
