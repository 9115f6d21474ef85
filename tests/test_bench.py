"""bench.py on a tiny model: the JSON contract, sane values, and the clear 'does not fit' error."""
import ctypes
import json
import os
import subprocess
import sys

import jax
import pytest

from benchmarks import bench
import cli_helpers
from configs import demo
from nfnets import cpu
from nfnets.cpu import tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ('images_per_sec', 'step_time_s', 'compile_time_s', 'flops_per_sec', 'mfu', 'peak_memory_bytes')


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_bench_cli_writes_json(tmp_path, mode):
  path = tmp_path / 'out.json'
  # One device, as a user runs it, with the suite's fast-compile flags.
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', XLA_FLAGS=cli_helpers.XLA_FLAGS)
  subprocess.run([sys.executable, '-m', 'benchmarks.bench', '--config=configs/demo.py', f'--mode={mode}',
                  '--batch_size=2', '--resolution=32', '--steps=2', '--peak_matmul_n=256',
                  f'--json={path}'], cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
  r = json.loads(path.read_text())
  for k in KEYS:
    assert k in r and r[k] > 0, k
  assert r['model'] == 'nfnet_tiny' and r['mode'] == mode and r['batch_size'] == 2
  assert r['images_per_sec'] == pytest.approx(2 / r['step_time_s'])
  assert r['forward_images_per_sec'] == pytest.approx(r['images_per_sec'] * (2 if mode == 'eval' else 1))
  assert r['flops_per_sec'] == pytest.approx(r['images_per_sec'] * r['flops_per_image'])
  assert 0 < r['mfu'] < 2            # a rough denominator, but not off by orders of magnitude
  assert 100e6 < r['peak_memory_bytes'] < 16e9
  assert r['xla_memory_bytes'] > 0
  assert r['tuning']['enabled'] is False   # the tests run with NFNETS_TUNING=off
  assert r['tuning']['fingerprint']['jax'] == jax.__version__
  assert all(r['matmul_peak_flops_per_sec'][d] > 0 for d in ('float32', 'bfloat16'))
  assert r['peak_flops_per_sec'] == r['matmul_peak_flops_per_sec'][r['dtype']]   # measured once


def test_tuning_report_counts_the_choices_per_op(monkeypatch):
  monkeypatch.setattr(tuning, '_used', {
      'conv_forward a': {'choice': 'xla', 'ms': {}}, 'conv_forward b': {'choice': 'split', 'ms': {}},
      'conv_forward c': {'choice': 'xla', 'ms': {}}, 'conv_kernel_grad a': {'choice': 'taps', 'ms': {}}})
  report = bench.tuning_report()
  assert report['summary'] == {'conv_forward': {'xla': 2, 'split': 1}, 'conv_kernel_grad': {'taps': 1}}
  assert set(report['choices']) == set(tuning._used)


def test_does_not_fit_names_the_memory_needed():
  with pytest.raises(bench.DoesNotFitError, match=r'needs about 3\.00 GiB.*only 1\.00 GiB'):
    bench.check_fits(3 * 2**30, 'F7 train step', available=2**30)


def test_unknown_variant_fails_before_compiling():
  with pytest.raises(ValueError, match='accepted'):
    bench.run(demo.get_config(), ['im2col'])


def test_fake_data_paths_do_not_import_tensorflow():
  """bench.py and an Experiment on fake data run without TensorFlow (~0.5 GiB of resident memory); the
  data pipeline still loads it on first use."""
  code = ('import sys, experiment\nfrom benchmarks import bench\n'
          'from configs import f0\n'
          'c = f0.get_config(); c.dataset.name = "fake"\n'
          'xp = experiment.Experiment(c)\n'
          'assert xp.info.num_train_examples == 1281167\n'
          'assert "tensorflow" not in sys.modules, "tensorflow imported"\n'
          'from nfnets import data\n'
          'data.train_iterator\n'
          'assert "tensorflow" in sys.modules\n'
          'from benchmarks import process_memory\n'
          'assert process_memory.peak_rss_bytes() > 50 * 2**20\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr[-2000:]


def _rss_bytes() -> int:
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmRSS:'))


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc_trim')
def test_release_free_memory_returns_freed_heap_to_the_os():
  """What the trainer and bench rely on after compiling: heap that was freed but kept by glibc (here
  200 MiB of 4 KiB blocks, below glibc's mmap threshold) goes back to the OS."""
  libc = ctypes.CDLL('libc.so.6')
  libc.malloc.restype = ctypes.c_void_p
  blocks = [libc.malloc(4096) for _ in range(51_200)]
  for b in blocks:
    ctypes.memset(b, 1, 4096)  # touch the pages so they are resident
  for b in blocks:
    libc.free(ctypes.c_void_p(b))
  before = _rss_bytes()
  assert cpu.release_free_memory() is True
  assert _rss_bytes() < before - 100 * 2**20
