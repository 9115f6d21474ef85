"""Global arrays for the per-device steps: batches split over the devices, the state replicated in buffers of
its own, and a prefetch that keeps the order and places each batch as the steps expect it."""
import jax
from jax.sharding import NamedSharding
import numpy as np

from nfnets import devices


def test_prefetch_places_batches_split_over_the_devices_in_order():
  mesh = devices.make_mesh()
  n = jax.device_count()
  batches = [{'x': np.arange(2 * n, dtype=np.float32) + 100 * i} for i in range(4)]
  on_device = list(devices.prefetch(iter(batches), mesh, 2))
  assert [float(b['x'][0]) for b in on_device] == [0., 100., 200., 300.]
  x = on_device[1]['x']
  assert x.sharding.is_equivalent_to(NamedSharding(mesh, devices.SPLIT), x.ndim)
  # Device d holds examples [2d, 2d + 2): each device's block of the batch is one contiguous slice.
  for shard in x.addressable_shards:
    d = list(mesh.devices.flat).index(shard.device)
    np.testing.assert_array_equal(shard.data, 100 + np.arange(2 * d, 2 * d + 2))
  # A per-device function sees its own slice and its collectives reduce over all devices.
  total = devices.map_per_device(lambda v: jax.lax.psum(v.sum(), devices.AXIS), mesh, devices.SPLIT,
                                 devices.REPLICATED)(x)
  assert float(total) == float(np.sum(batches[1]['x']))


def test_put_replicated_copies_the_host_tree_onto_every_device():
  mesh = devices.make_mesh()
  # A 64-byte-aligned host array, which XLA:CPU would place without a copy (device_put's may_alias=False
  # does not prevent it): the case that made this test pass or fail with the allocator's luck.
  raw = np.empty(6 * 4 + 64, np.uint8)
  start = -raw.ctypes.data % 64
  host = {'w': raw[start:start + 24].view(np.float32).reshape(2, 3)}
  host['w'][:] = np.arange(6).reshape(2, 3)
  placed = jax.block_until_ready(devices.put_replicated(host, mesh))   # the transfer is asynchronous
  assert placed['w'].sharding.is_fully_replicated and len(placed['w'].addressable_shards) == jax.device_count()
  host['w'][:] = -1   # the device copy does not alias the host array (so a step may donate it)
  np.testing.assert_array_equal(devices.to_host(placed)['w'], np.arange(6).reshape(2, 3))
  # Donated to a step, the result is right. (Whether XLA:CPU reuses the buffer in place depends on whether
  # it kept the host copy as its buffer; the train step's in-place test in test_experiment covers the state.)
  step = devices.map_per_device(lambda t: jax.tree.map(lambda v: v + 1, t), mesh, devices.REPLICATED,
                                devices.REPLICATED, donate_argnums=(0,))
  out = step(placed)
  np.testing.assert_array_equal(devices.to_host(out)['w'], np.arange(6).reshape(2, 3) + 1)
