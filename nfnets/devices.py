"""Per-device code over all devices of all processes: pmap's semantics, compiled with jit + shard_map.

Device code is written for one device, with its collectives (`lax.pmean`, `lax.psum`) over the axis
`AXIS`. Every array it takes and returns has a leading device axis: the replicated train state holds one
copy per device, a batch one slice per device. `map_per_device` compiles such code one way for a single
process and for many: `jax.jit(jax.shard_map(fn on the squeezed block))` over a 1-D mesh of every
device. Each device's block has size 1 along the device axis; `fn` sees it without that axis (a bitcast,
so XLA still updates a donated state in place). Vmapping over the size-1 axis instead would compute the
same thing, but XLA:CPU then reduces over [1, fan_in, out] weights (weight standardisation, AGC) ~10x
slower than over [fan_in, out].

Host data enters through `put`, which builds global arrays from each process's local part (leading axis:
the local devices); `first_local` reads one device's copy back on every process.
"""
import functools
from typing import Callable, Optional, Sequence

import jax
import numpy as np

AXIS = 'devices'  # the one axis every collective reduces over


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """A 1-D mesh over `devices` (default: every device of every process, each process's together).

  A subset of the devices is only meaningful in a single-process run: with several processes every
  device must take part, or collectives would reduce over some processes only.
  """
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  elif jax.process_count() > 1 and len(devices) != jax.device_count():
    raise ValueError(f'A multi-process run maps over all {jax.device_count()} devices; got {len(devices)}')
  return jax.sharding.Mesh(np.array(list(devices)), (AXIS,))


def device_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading axis split over the devices: one slice (or one replica) per device."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def local_device_count(mesh: jax.sharding.Mesh) -> int:
  return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def map_per_device(fn: Callable, mesh: jax.sharding.Mesh, num_args: int,
                   donate_argnums: Sequence[int] = ()) -> Callable:
  """Compiles per-device `fn(*args)` over the mesh; every argument and output has the device axis.

  Arguments `fn` does not read are kept (`keep_unused`), so a donated one still lends its buffers to the
  outputs of the same shape instead of being dropped from the program.
  """
  spec = jax.sharding.PartitionSpec(AXIS)
  mapped = jax.shard_map(_squeezed(fn), mesh=mesh, in_specs=(spec,) * num_args, out_specs=spec)
  return jax.jit(mapped, donate_argnums=tuple(donate_argnums), keep_unused=True)


def _squeezed(fn: Callable) -> Callable:
  """fn on one device's block (size 1 along the device axis) with that axis dropped, then restored."""
  @functools.wraps(fn)   # the compiled program keeps fn's name (profiles, HLO dumps)
  def on_block(*args):
    out = fn(*jax.tree.map(lambda x: x[0], args))
    return jax.tree.map(lambda y: y[None], out)
  return on_block


def replicate(tree, n: int):
  """Stacks a host tree along a new leading device axis (a view: no copy)."""
  return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree)


def put(local_tree, sharding: jax.sharding.NamedSharding):
  """Global arrays from this process's part of a tree (leading axis: its local devices).

  Asynchronous. In a single-process run this is `jax.device_put`; with several processes each one passes
  its own local slices and gets the global array they form together.
  """
  if jax.process_count() == 1:
    return jax.device_put(local_tree, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_tree)


def first_local(tree):
  """This process's first device's copy of a replicated tree (or its slice of a split one), as NumPy."""
  def first(x):
    if hasattr(x, 'addressable_shards'):
      x = x.addressable_shards[0].data
    return np.asarray(x)[0, ...]  # `[0, ...]`: a 0-d array for a scalar leaf, not a NumPy scalar
  return jax.tree.map(first, tree)
