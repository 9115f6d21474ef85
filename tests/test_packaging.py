"""The package installs: `pip install -e .` (what `make venv` runs) into a fresh environment makes `nfnets`,
the recipes and the commands work from any folder, as entry points and as scripts run by path."""
import os
import subprocess
import sys
import sysconfig

import pytest

from cli_helpers import ROOT


@pytest.fixture(scope='module')
def venv(tmp_path_factory):
  """A new virtual environment that sees this one's packages (a .pth file) but not the repository, with
  the project installed in editable mode (no index needed: no dependencies, no build isolation)."""
  path = tmp_path_factory.mktemp('venv')
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(path)], check=True)
  python = str(path / 'bin' / 'python')
  purelib = subprocess.run([python, '-c', "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           check=True, capture_output=True, text=True).stdout.strip()
  with open(os.path.join(purelib, 'parent.pth'), 'w') as f:
    f.write(sysconfig.get_paths()['purelib'] + '\n')
  proc = subprocess.run([sys.executable, '-m', 'pip', '--python', python, 'install', '--quiet', '--no-deps',
                         '--no-build-isolation', '-e', ROOT], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return path


def test_import_from_another_folder(venv, tmp_path):
  proc = subprocess.run([str(venv / 'bin' / 'python'), '-c',
                         'import nfnets, configs.base, tools.predict, train; '
                         'print(nfnets.__file__); print(configs.base.get_config().model.name)'],
                        cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=''))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == [os.path.join(ROOT, 'nfnets', '__init__.py'), 'F0']


def test_commands_run_as_entry_points_and_by_path(venv, tmp_path):
  env = dict(os.environ, PYTHONPATH='')
  entry = subprocess.run([str(venv / 'bin' / 'nfnets-sample-images'), '--out=a'], cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=300, env=env)
  assert entry.returncode == 0, entry.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / 'a')) == (['china.jpg'] + [f'digit_{i}.png' for i in range(10)]
                                                 + ['flower.jpg', 'three_digits'])
  assert sorted(os.listdir(tmp_path / 'a' / 'three_digits')) == ['one', 'seven', 'zero']
  assert len(os.listdir(tmp_path / 'a' / 'three_digits' / 'seven')) == 39   # the test split's sevens
  # One project line on stderr, the paths written on stdout.
  assert len(entry.stderr.strip().splitlines()) == 1 and 'sample_images.py' in entry.stderr
  assert entry.stdout == ('Wrote a/digit_*.png, a/flower.jpg and a/china.jpg, and '
                          'a/three_digits/{zero,one,seven}/*.png\n')
  # A script run by its path finds the installed package (absl's --helpshort exits with status 1).
  by_path = subprocess.run([str(venv / 'bin' / 'python'), os.path.join(ROOT, 'tools', 'predict.py'),
                            '--helpshort'], cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
                           env=env)
  assert by_path.returncode == 1 and 'Error' not in by_path.stderr, by_path.stderr[-3000:]
  assert by_path.stdout.startswith('Classifies image files with NFNet weights') and '--weights' in by_path.stdout
  scripts = sorted(n for n in os.listdir(venv / 'bin') if n.startswith('nfnets-'))
  assert scripts == ['nfnets-export', 'nfnets-linear-probe', 'nfnets-predict', 'nfnets-preview-augmentation',
                     'nfnets-sample-images', 'nfnets-sweep', 'nfnets-train']
