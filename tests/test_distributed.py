"""Multi-process runs: 2 processes x 2 devices train exactly like 1 process x 4 devices; bad input fails fast.

The processes are real (launch_local.py: localhost coordinator, gloo CPU collectives).
"""
import io
import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cli_helpers  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_experiment import SMALL_NF_RESNET  # pylint: disable=g-import-not-at-top,wrong-import-position
from tools import launch_local  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import distributed  # pylint: disable=g-import-not-at-top,wrong-import-position

# The suite's fast-compile XLA flags (compile time dominates these short runs), for both sides of a comparison.
ENV = {'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '2', 'XLA_FLAGS': cli_helpers.XLA_FLAGS,
       # The suite's persistent compilation cache (conftest.py): a second run skips most compiles.
       'JAX_COMPILATION_CACHE_DIR': os.path.join(ROOT, '.pytest_cache', 'jax_cache'),
       'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0.5'}
STEPS = 3


def train_flags(workdir, **overrides):
  flags = {'batch_size': 16, 'training_steps': STEPS, 'log_every': 1, 'eval_every': 0,
           'checkpoint_every': STEPS, 'eval_batch_size': 360, 'dataset.image_size': 16,
           'dataset.eval_image_size': 16, 'model.stochdepth_rate': 0.0, 'model.drop_rate': 0.0,
           'model.conv_impl': 'xla', 'optimizer.warmup_epochs': 0.01, 'optimizer.base_lr': 0.4,
           'dtype': 'float32', **SMALL_NF_RESNET}
  flags.update(overrides)
  return ['--config=configs/demo.py', f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in flags.items()]


# ------------------------------------------------------------------------------------------ cluster detection

def test_detect_from_flags_and_env():
  c = distributed.detect('10.0.0.1:1234', 2, 1, environ={})
  assert (c.source, c.coordinator_address, c.num_processes, c.process_id) == ('flags', '10.0.0.1:1234', 2, 1)
  env = {'JAX_COORDINATOR_ADDRESS': 'host:99', 'JAX_NUM_PROCESSES': '4', 'JAX_PROCESS_ID': '3'}
  c = distributed.detect(environ=env)
  assert (c.source, c.num_processes, c.process_id, c.is_multi_process) == ('env', 4, 3, True)
  assert not distributed.detect(environ={'JAX_PLATFORMS': 'cpu'}).is_multi_process


@pytest.mark.parametrize('args,match', [
    (('h:1', 2, None), r"not \['process_id'\]"),
    ((None, 2, 0), r"not \['coordinator_address'\]"),
    (('h:1', 2, 2), '0 <= process_id < num_processes'),
    (('h:1', 0, 0), 'num_processes >= 1'),
    (('no-port', 2, 0), 'must be HOST:PORT'),
])
def test_detect_rejects_bad_flags(args, match):
  with pytest.raises(ValueError, match=match):
    distributed.detect(*args, environ={})


def test_detect_slurm():
  env = {'SLURM_JOB_ID': '4242', 'SLURM_STEP_NODELIST': 'gpu[017-018]', 'SLURM_NTASKS': '2',
         'SLURM_PROCID': '1', 'SLURM_LOCALID': '0', 'SLURM_STEP_NUM_NODES': '2', 'JAX_PLATFORMS': ''}
  c = distributed.detect(environ=env)
  assert (c.source, c.coordinator_address, c.num_processes, c.process_id) == ('slurm', 'gpu017:61586', 2, 1)
  assert c.local_device_ids is None   # one task per node: all of its GPUs
  c = distributed.detect(environ=dict(env, SLURM_NTASKS='16', SLURM_LOCALID='5'))
  assert c.local_device_ids == [5]    # one task per GPU
  assert distributed.detect(environ=dict(env, SLURM_NTASKS='1')).source != 'slurm'
  assert distributed.slurm_coordinator('a1,b2', '1') == 'a1:61441'
  assert distributed.slurm_coordinator('node[001,007-015],x', '4096') == 'node001:61440'


def test_child_env():
  env = launch_local.child_env(1, 2, 3, 5555, {'XLA_FLAGS': '--foo --xla_force_host_platform_device_count=8'})
  assert env['XLA_FLAGS'] == '--foo --xla_force_host_platform_device_count=3'
  assert (env['JAX_COORDINATOR_ADDRESS'], env['JAX_NUM_PROCESSES'], env['JAX_PROCESS_ID']) == (
      'localhost:5555', '2', '1')


# ------------------------------------------------------------------------------------------ failures

def _python(code, timeout):
  t = time.time()
  p = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=ROOT, env={**os.environ, **ENV},
                     capture_output=True, text=True, timeout=timeout)
  return p.returncode, p.stdout + p.stderr, time.time() - t


def test_unreachable_coordinator_fails_with_clear_error():
  port = launch_local.free_port()
  code, out, _ = _python(f"""
      import time
      from nfnets import distributed
      t = time.time()
      try:
        distributed.initialize(distributed.Cluster('flags', 'localhost:{port}', 2, 1), initialization_timeout=3)
      except distributed.DistributedError as e:
        print('ERROR after %.1fs:' % (time.time() - t), e)
      """, timeout=120)
  assert code == 0 and f'Could not reach the coordinator at localhost:{port}' in out, out
  assert float(out.split('ERROR after ')[1].split('s:')[0]) < 10


def test_missing_peer_times_out_instead_of_hanging():
  # Process 0 of 2 starts the coordinator and waits for a process 1 that never comes.
  code, out, _ = _python(f"""
      from nfnets import distributed
      distributed.initialize(distributed.Cluster('flags', 'localhost:{launch_local.free_port()}', 2, 0),
                             initialization_timeout=3)
      print('joined?!')
      """, timeout=120)
  assert code == distributed.WATCHDOG_EXIT_CODE, out
  assert 'timed out after 3s joining the JAX distributed runtime' in out and 'joined?!' not in out


CRASHING_WORKER = """
import os, sys, time
sys.path.insert(0, {root!r})
import numpy as np
from nfnets import distributed
distributed.initialize(distributed.detect(), initialization_timeout=60, heartbeat_timeout=10)
import jax
step = jax.pmap(lambda x: jax.lax.psum(x, 'i'), axis_name='i')
with distributed.exit_hard_on_error():
  for i in range(10**6):
    jax.block_until_ready(step(np.ones(jax.local_device_count(), np.float32)))
    if i == 3 and jax.process_index() == {victim}:
      raise RuntimeError('simulated crash in process {victim}')
"""


@pytest.mark.parametrize('victim', [1, 0])
def test_crashed_process_stops_its_peers(tmp_path, victim):
  """Without a launcher to clean up (as on a real cluster), the runtime ends the survivor."""
  script = tmp_path / 'worker.py'
  script.write_text(CRASHING_WORKER.format(root=ROOT, victim=victim))
  port = launch_local.free_port()
  procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=launch_local.child_env(i, 2, 2, port, {**os.environ, **ENV}))
           for i in range(2)]
  t = time.time()
  try:
    outs = [p.communicate(timeout=150)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode != 0 for p in procs), [p.returncode for p in procs]
  assert f'simulated crash in process {victim}' in outs[victim]
  assert time.time() - t < 120


def test_launcher_stops_the_group_when_one_process_fails(tmp_path):
  script = tmp_path / 'fail.py'
  script.write_text('import os, sys, time\n'
                    'if os.environ["JAX_PROCESS_ID"] == "1": sys.exit(3)\n'
                    'time.sleep(600)\n')
  out, t = io.StringIO(), time.time()
  assert launch_local.launch([], 3, 1, script=str(script), out=out) == 3
  assert time.time() - t < 30 and 'process 1 exited with code 3' in out.getvalue()


def test_batch_not_divisible_by_processes(tmp_path):
  out = io.StringIO()
  code = launch_local.launch(train_flags(tmp_path / 'w', batch_size=6), 2, 2, out=out, env=ENV, timeout_s=240)
  assert code == 2, out.getvalue()[-3000:]  # a user error
  assert 'batch_size=6 must be divisible by processes (2) x local devices (2)' in out.getvalue()


def test_eval_batch_not_divisible_fails_at_start():
  import experiment  # pylint: disable=g-import-not-at-top
  from test_experiment import tiny_config  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r'eval_batch_size=42 must be divisible by processes \(1\) '
                                       r'x local devices \(4\)'):
    experiment.Experiment(tiny_config(eval_batch_size=42))


# ------------------------------------------------------------------------------------------ equality

def _restore(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), item_names=('state', 'meta'),
                             options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    step = manager.latest_step()
    return step, manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']


def _train_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r['loss'] for r in map(json.loads, f) if r['kind'] == 'train']


def test_two_processes_equal_one_process(tmp_path):
  """2 processes x 2 devices vs 1 process x 4 devices: same params and loss, with no special feeding.

  The global batch at a step is a function of (seed, step), each process reading its contiguous slice, so
  plain train.py on 1 process reads the same global batches as the 2 processes together; stochastic depth
  and dropout are off, so the two device layouts draw no random numbers.
  """
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  ref_log = open(tmp_path / 'single.log', 'w')
  ref = subprocess.Popen([sys.executable, 'train.py'] + train_flags(single), cwd=ROOT,
                         stdout=ref_log, stderr=subprocess.STDOUT,
                         env=launch_local.child_env(0, 1, 4, launch_local.free_port(), {**os.environ, **ENV}))
  out = io.StringIO()
  code = launch_local.launch(train_flags(multi), 2, 2, out=out, env=ENV, timeout_s=400)
  assert code == 0, out.getvalue()[-5000:]
  assert ref.wait(timeout=400) == 0, (tmp_path / 'single.log').read_text()[-5000:]
  assert 'process 1 of 2, 2 local device(s) of 4' in out.getvalue()

  (step_m, s_m), (step_s, s_s) = _restore(multi), _restore(single)
  assert step_m == step_s == STEPS and int(s_m['step']) == int(s_s['step']) == STEPS
  worst = {}
  for name in ('params', 'ema_params', 'opt_state'):
    a, b = jax.tree.leaves(s_m[name]), jax.tree.leaves(s_s[name])
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
      # Only the cross-device reduction order differs (gloo across processes vs in-process all-reduce).
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=name)
    worst[name] = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
  # The momentum (the optimizer state's float leaves; its integer step count would pass alone) is
  # non-zero: the steps really computed updates.
  momentum = [x for x in jax.tree.leaves(s_m['opt_state']) if np.issubdtype(np.asarray(x).dtype, np.floating)]
  assert len(momentum) > 10 and max(float(np.max(np.abs(x))) for x in momentum) > 0
  l_m, l_s = _train_losses(multi), _train_losses(single)
  assert len(l_m) == len(l_s) == STEPS
  np.testing.assert_allclose(l_m, l_s, rtol=1e-5)
  print(f'max |delta| {worst}; losses 2x2 {l_m} vs 1x4 {l_s}')
  # Only process 0 wrote logs: one record per step, not one per process.
  assert [json.loads(r)['step'] for r in open(os.path.join(multi, 'metrics.jsonl'))
          if json.loads(r)['kind'] == 'train'] == list(range(1, STEPS + 1))
