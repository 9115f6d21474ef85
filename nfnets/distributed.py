"""Multi-process start-up through JAX's own distributed runtime (`jax.distributed.initialize`).

Where the processes come from, first match wins:
  1. flags: --coordinator_address, --num_processes, --process_id (all three, or none);
  2. the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (what tools/launch_local.py sets);
  3. SLURM (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS > 1, SLURM_PROCID, SLURM_LOCALID);
  4. a Cloud TPU VM (libtpu installed): JAX's own TPU detection; one host is a plain single process;
  5. otherwise one process, no distributed runtime.

Failure behaviour (what a multi-node run needs, so a job never hangs until its wall-clock limit):
  - an unreachable coordinator raises `DistributedError` within `initialization_timeout` seconds, naming the
    address; if the runtime itself blocks longer (e.g. process 0 waiting for peers that never start), a
    watchdog ends the process with the same kind of message instead of hanging;
  - a peer that dies is noticed by the coordination service (closed connection at once, or no heartbeat for
    `heartbeat_timeout` seconds), which terminates the surviving processes;
  - a Python exception in one process must not end in the runtime's shutdown barrier (which waits
    `shutdown_timeout` seconds for peers that are stuck in a collective): `exit_hard_on_error` logs the
    traceback and exits at once, which the peers see as a dead task.
"""
import contextlib
import dataclasses
import importlib.util
import os
import re
import socket
import sys
import threading
import time
import traceback
from typing import Mapping, Optional, Sequence

from absl import logging

ENV_ADDRESS, ENV_NUM, ENV_ID = 'JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'
WATCHDOG_EXIT_CODE = 75  # EX_TEMPFAIL: the cluster did not come up; retrying the job may help


class DistributedError(RuntimeError):
  pass


@dataclasses.dataclass(frozen=True)
class Cluster:
  """How this process joins the job. `source` is 'flags', 'env', 'slurm', 'tpu' or 'single'."""
  source: str
  coordinator_address: Optional[str] = None
  num_processes: int = 1
  process_id: int = 0
  local_device_ids: Optional[Sequence[int]] = None   # None: every device this host has

  @property
  def is_multi_process(self) -> bool:
    return self.source == 'tpu' or self.num_processes > 1


def _explicit(address, num, pid, names, source) -> Optional[Cluster]:
  given = {n: v for n, v in zip(names, (address, num, pid)) if v not in (None, '')}
  if not given:
    return None
  missing = [n for n in names if n not in given]
  if missing:
    raise ValueError(f'Multi-process runs need all of {", ".join(names)}; got {sorted(given)} but not '
                     f'{missing}')
  try:
    num, pid = int(num), int(pid)
  except ValueError as e:
    raise ValueError(f'{names[1]}={num!r} and {names[2]}={pid!r} must be integers') from e
  if num < 1 or not 0 <= pid < num:
    raise ValueError(f'Need {names[1]} >= 1 and 0 <= {names[2]} < {names[1]}; got {num} and {pid}')
  if not re.fullmatch(r'.+:\d+', str(address)):
    raise ValueError(f'{names[0]}={address!r} must be HOST:PORT, e.g. 10.0.0.1:1234')
  return Cluster(source, str(address), num, pid)


def slurm_coordinator(nodelist: str, job_id: str) -> str:
  """First host of a SLURM node list ('node[001-004,9],gpu7' -> 'node001') and JAX's port for the job."""
  m = re.match(r'([^,\[]+)(?:\[([^,\-\]]+))?', nodelist)
  if not m:
    raise ValueError(f'Cannot parse SLURM_STEP_NODELIST={nodelist!r}')
  port = int(job_id) % 2**12 + (65535 - 2**12 + 1)   # the rule jax's own SLURM detection uses
  return f'{m.group(1)}{m.group(2) or ""}:{port}'


def detect(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
           process_id: Optional[int] = None, environ: Mapping[str, str] = os.environ) -> Cluster:
  """The cluster this process belongs to, from flags, environment, SLURM or TPU (see module doc)."""
  cluster = _explicit(coordinator_address, num_processes, process_id,
                      ('coordinator_address', 'num_processes', 'process_id'), 'flags')
  if cluster:
    return cluster
  cluster = _explicit(environ.get(ENV_ADDRESS), environ.get(ENV_NUM), environ.get(ENV_ID),
                      (ENV_ADDRESS, ENV_NUM, ENV_ID), 'env')
  if cluster:
    return cluster
  slurm = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
  if all(k in environ for k in slurm) and int(environ['SLURM_NTASKS']) > 1:
    ntasks = int(environ['SLURM_NTASKS'])
    nodes = int(environ.get('SLURM_STEP_NUM_NODES', environ.get('SLURM_NNODES', ntasks)))
    # One task per node drives all its GPUs; several tasks per node each take GPU SLURM_LOCALID (JAX's
    # SLURM default), unless SLURM already gave each task its own CUDA_VISIBLE_DEVICES.
    per_gpu = ntasks > nodes and ',' in environ.get('CUDA_VISIBLE_DEVICES', ',')
    return Cluster('slurm', slurm_coordinator(environ['SLURM_STEP_NODELIST'], environ['SLURM_JOB_ID']),
                   ntasks, int(environ['SLURM_PROCID']),
                   [int(environ['SLURM_LOCALID'])] if per_gpu else None)
  if importlib.util.find_spec('libtpu') is not None and environ.get('JAX_PLATFORMS', 'tpu') in ('', 'tpu'):
    return Cluster('tpu')
  return Cluster('single')


def _wait_for_coordinator(address: str, deadline: float) -> None:
  host, port = address.rsplit(':', 1)
  host = host.strip('[]')
  last = None
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=max(0.1, min(2.0, deadline - time.time()))):
        return
    except OSError as e:
      last = e
    if time.time() >= deadline:
      raise DistributedError(f'Could not reach the coordinator at {address} ({last}). Check that process 0 is '
                             'running, that the address and port are right and reachable from this host, '
                             'and raise --initialization_timeout if process 0 starts late.')
    time.sleep(0.5)


def _fatal(message: str, code: int) -> None:
  """Exits now, from any thread: the runtime's own failure path aborts with a less helpful message."""
  sys.stderr.write(f'\nFATAL: {message}\n')
  sys.stderr.flush()
  os._exit(code)


def initialize(cluster: Cluster, initialization_timeout: int = 300, heartbeat_timeout: int = 100,
               cpu_devices: Optional[int] = None) -> None:
  """Joins the job; must run before anything touches devices. A single-process cluster does nothing.

  Args:
    cluster: from `detect`.
    initialization_timeout: seconds to wait for the coordinator and every peer; then a clear error.
    heartbeat_timeout: seconds without a heartbeat after which the runtime declares a peer dead.
    cpu_devices: simulated CPU devices for this process (multi-process tests on one machine).
  """
  import jax  # pylint: disable=g-import-not-at-top
  if cpu_devices:
    jax.config.update('jax_num_cpu_devices', int(cpu_devices))
  if not cluster.is_multi_process:
    return
  # Cross-process collectives on CPU (tests, CPU clusters) go through gloo; GPUs/TPUs use their own.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  t0 = time.time()
  deadline = t0 + initialization_timeout
  if cluster.source == 'tpu':
    try:
      jax.distributed.initialize(initialization_timeout=initialization_timeout,
                                 heartbeat_timeout_seconds=heartbeat_timeout)
    except ValueError as e:   # not a TPU pod JAX knows how to set up: one host, one process
      logging.info('No multi-host TPU environment detected (%s); running as one process.', e)
    return
  if cluster.process_id != 0:
    _wait_for_coordinator(cluster.coordinator_address, deadline)
  watchdog = threading.Timer(
      max(1.0, deadline - time.time()), _fatal,
      (f'Process {cluster.process_id} of {cluster.num_processes} timed out after {initialization_timeout}s '
       f'joining the JAX distributed runtime at {cluster.coordinator_address} (source: {cluster.source}). '
       'Not every process connected: check that all of them were started with the same coordinator '
       'address and process count, and distinct process ids.', WATCHDOG_EXIT_CODE))
  watchdog.daemon = True
  watchdog.start()
  try:
    # The runtime's own timeout is a backstop a little after ours: it aborts with a less clear message.
    jax.distributed.initialize(cluster.coordinator_address, cluster.num_processes, cluster.process_id,
                               local_device_ids=cluster.local_device_ids,
                               cluster_detection_method='deactivate',
                               initialization_timeout=int(initialization_timeout) + 30,
                               heartbeat_timeout_seconds=heartbeat_timeout)
  finally:
    watchdog.cancel()
  logging.info('Joined the JAX distributed runtime at %s as process %d of %d (%s) in %.1fs',
               cluster.coordinator_address, cluster.process_id, cluster.num_processes, cluster.source,
               time.time() - t0)


@contextlib.contextmanager
def exit_hard_on_error(user_errors=()):
  """In a multi-process run, an exception ends the process at once (after logging it) instead of
  waiting in the runtime's shutdown barrier for peers that are blocked in a collective. Exceptions of the
  `user_errors` types end it with their message alone and exit status 2."""
  try:
    yield
  except user_errors as e:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.distributed.is_initialized():
      _fatal('\n'.join(f'error: {line}' for line in str(e).splitlines()), 2)
    raise
  except (KeyboardInterrupt, Exception):  # pylint: disable=broad-except
    import jax  # pylint: disable=g-import-not-at-top
    if jax.distributed.is_initialized():
      _fatal(f'process {jax.process_index()} failed; exiting so its peers stop too:\n'
             + traceback.format_exc(), 1)
    raise
