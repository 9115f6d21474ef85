"""RunDir: restore into a template, fallback past damaged checkpoints, metrics.jsonl after a resume, eval lines.

The states are a few NumPy arrays made by hand (no model, no training); the config is configs/demo.py's.
"""
import glob
import json
import logging
import os
import sys
from typing import NamedTuple

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import demo  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import init_weights  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import run_dir  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.train_state import TrainState  # pylint: disable=g-import-not-at-top,wrong-import-position

# A failed tensorstore read in orbax leaves a callback for its closed event loop ("Event loop is closed").
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


class Momentum(NamedTuple):  # fields not in alphabetical order: orbax stores a NamedTuple as a dict
  velocity: dict
  count: np.ndarray


class Empty(NamedTuple):
  pass


def config(keep=3):
  c = demo.get_config()
  c.keep_checkpoints = keep
  return c


def host_state(step: int, wide: int = 4) -> TrainState:
  """A small state whose every value depends on `step` (so steps are told apart bit for bit)."""
  rng = np.random.default_rng(step)
  params = {'stem_conv': {'w': rng.standard_normal((3, 3, 3, wide)).astype(np.float32)},
            'linear': {'w': rng.standard_normal((wide, 10)).astype(np.float32),
                       'b': rng.standard_normal((10,)).astype(np.float32)}}
  velocity = jax.tree.map(lambda x: (x * 0.5 + step).astype(np.float32), params)
  return TrainState(step=np.asarray(step, np.int32), params=params,
                    opt_state=(Momentum(velocity=velocity, count=np.asarray(step * 3, np.int32)), Empty()),
                    ema_params=jax.tree.map(lambda x: (x - step).astype(np.float32), params),
                    rng=np.asarray([7, step], np.uint32), bad_step=np.asarray(-1, np.int32))


def template(wide: int = 4) -> TrainState:
  return jax.tree.map(np.zeros_like, host_state(0, wide))



def assert_same(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  if isinstance(want, TrainState):
    assert isinstance(got.opt_state[0], Momentum) and isinstance(got.opt_state[1], Empty)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    assert isinstance(g, np.ndarray) and g.dtype == w.dtype, path
    np.testing.assert_array_equal(g, w, err_msg=jax.tree_util.keystr(path))


@pytest.fixture
def workdir(tmp_path):
  """A workdir with checkpoints at steps 2, 4 and 6."""
  rd = run_dir.RunDir(str(tmp_path), config())
  for step in (2, 4, 6):
    rd.save(step, host_state(step))
  rd.close()
  return str(tmp_path)


def step_dir(workdir, step):
  return os.path.join(workdir, 'checkpoints', str(step))


def truncate(path):
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])


DAMAGE = {  # files orbax writes in a step directory, each of which a restore needs
    'meta_json': 'meta/metadata',
    'state_metadata': 'state/_METADATA',
    'state_array_data': 'state/d/*',
    'state_manifest': 'state/manifest.ocdbt',
}


def damage(workdir, step, what='meta_json'):
  paths = glob.glob(os.path.join(step_dir(workdir, step), DAMAGE[what]))
  assert paths, f'orbax wrote no {DAMAGE[what]} in step {step}'
  for p in paths:
    truncate(p)


def test_restore_is_bit_exact_and_none_without_checkpoints(workdir, tmp_path_factory):
  empty = run_dir.RunDir(str(tmp_path_factory.mktemp('empty')), config())
  assert empty.restore(template()) is None and empty.latest_step() is None
  rd = run_dir.RunDir(workdir, config())
  assert rd.latest_step() == 6
  assert_same(rd.restore(template()), host_state(6))


@pytest.mark.parametrize('what', sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(workdir, what, caplog):
  damage(workdir, 6, what)
  damaged_files = sorted(os.path.relpath(p, step_dir(workdir, 6))
                         for p in glob.glob(os.path.join(step_dir(workdir, 6), '**'), recursive=True))
  rd = run_dir.RunDir(workdir, config())
  with caplog.at_level(logging.WARNING):
    state = rd.restore(template())
  assert_same(state, host_state(4))
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(f'step 6 at {step_dir(workdir, 6)} is damaged' in w and 'Error' in w for w in warnings), warnings
  # Kept, whole, under another name that orbax does not take for a step; the next start does not retry it.
  aside = glob.glob(step_dir(workdir, 6) + '.damaged-*')
  assert len(aside) == 1 and not os.path.exists(step_dir(workdir, 6))
  assert sorted(os.path.relpath(p, aside[0]) for p in glob.glob(os.path.join(aside[0], '**'),
                                                                 recursive=True)) == damaged_files
  assert rd.latest_step() == 4
  # The resumed run saves steps 5 and 6 (orbax would skip both with the damaged step 6 in place).
  rd.save(5, host_state(5))
  rd.save(6, host_state(60))
  rd.close()
  again = run_dir.RunDir(workdir, config())
  assert again.latest_step() == 6
  assert_same(again.restore(template()), host_state(60))


def test_every_checkpoint_damaged_names_each(workdir):
  for step, what in ((2, 'state_array_data'), (4, 'state_metadata'), (6, 'meta_json')):
    damage(workdir, step, what)
  with pytest.raises(run_dir.CheckpointRestoreError) as err:
    run_dir.RunDir(workdir, config()).restore(template())
  msg = str(err.value)
  assert 'None of the 3 checkpoints' in msg
  for step in (6, 4, 2):
    assert f'step {step} at {step_dir(workdir, step)}: ' in msg, msg
  assert msg.index('step 6') < msg.index('step 4') < msg.index('step 2')
  assert 'JSONDecodeError' in msg
  assert all(os.path.isdir(step_dir(workdir, s)) for s in (2, 4, 6))  # nothing moved


@pytest.mark.parametrize('change', ['param_shape', 'model', 'optimizer_shape', 'optimizer_extra_leaf',
                                    'optimizer_shape_metadata_unread'])
def test_incompatible_checkpoint_is_an_error_not_a_fallback(workdir, change, monkeypatch):
  damage(workdir, 4)  # an older damaged one changes nothing: the newest is refused first
  cfg, tmpl = config(), template()
  momentum = tmpl.opt_state[0]
  if change == 'param_shape':
    tmpl = template(wide=5)
  elif change == 'model':
    cfg.model.name = 'nfnet_f0'
  elif change == 'optimizer_extra_leaf':  # the optimizer state is not in the meta record: orbax's metadata
    tmpl = tmpl._replace(opt_state=(momentum, Empty(), np.zeros((), np.int32)))
  else:
    tmpl = tmpl._replace(opt_state=(momentum._replace(count=np.zeros((2,), np.int32)), Empty()))
    if change == 'optimizer_shape_metadata_unread':  # then the restored arrays' shapes are checked
      def unreadable(*unused):
        raise OSError('metadata not read')
      monkeypatch.setattr(run_dir.ocp.StandardCheckpointHandler, 'metadata', unreadable)
  with pytest.raises(run_dir.IncompatibleCheckpointError, match='incompatible with this config'):
    run_dir.RunDir(workdir, cfg).restore(tmpl)
  assert all(os.path.isdir(step_dir(workdir, s)) for s in (2, 4, 6))
  assert not glob.glob(os.path.join(workdir, 'checkpoints', '*.damaged-*'))


def write_metrics(workdir, lines):
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.write(''.join(lines))


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_metrics_after_the_restored_step_are_dropped(workdir, caplog):
  damage(workdir, 6)  # restores step 4
  lines = [json.dumps({'step': s, 'kind': 'train', 'loss': 1.0 / s}) + '\n' for s in range(1, 10)]
  write_metrics(workdir, lines[:-1] + [lines[-1][:12]])  # the last one cut short by the interruption
  rd = run_dir.RunDir(workdir, config())
  with caplog.at_level(logging.INFO, logger='absl'):
    assert int(rd.restore(template()).step) == 4
  assert [r['step'] for r in read_metrics(workdir)] == [1, 2, 3, 4]
  assert read_metrics(workdir)[3] == {'step': 4, 'kind': 'train', 'loss': 0.25}
  infos = [r.getMessage() for r in caplog.records]
  assert any('dropped 4 records of steps after 4' in m and '1 unreadable' in m for m in infos), infos
  assert not [f for f in os.listdir(workdir) if f.startswith('metrics.jsonl.tmp')]
  # The resumed run appends from step 5: one record per step.
  for s in (5, 6):
    rd.log_train(s, {'loss': 0.1, 'top1': 0.5, 'lr': 0.1, 'clip_fraction': 0.0, 'images_per_sec': 1.0}, 1.0)
  rd.close()
  assert [r['step'] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]


def test_log_eval_line_with_and_without_top5(tmp_path, caplog):
  rd = run_dir.RunDir(str(tmp_path), config())
  base = {'num_examples': 40, 'top1': 0.5, 'loss': 1.25, 'ema_top1': 0.75, 'ema_loss': 1.5}
  with caplog.at_level(logging.INFO, logger='absl'):
    rd.log_eval(3, dict(base))
    rd.log_eval(4, dict(base, top5=0.9, ema_top5=0.95))
  rd.close()
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('eval at step')]
  assert lines == [
      'eval at step 3 on 40 examples | top1 50.00% loss 1.2500 | EMA top1 75.00% loss 1.5000',
      'eval at step 4 on 40 examples | top1 50.00% top5 90.00% loss 1.2500 | '
      'EMA top1 75.00% top5 95.00% loss 1.5000']
  assert [(r['step'], 'top5' in r) for r in read_metrics(str(tmp_path))] == [(3, False), (4, True)]


def test_weights_of_a_workdir_are_the_newest_readable_ema_params(workdir, caplog):
  damage(workdir, 6, 'state_array_data')
  with caplog.at_level(logging.WARNING):
    for path in (workdir, os.path.join(workdir, 'checkpoints')):
      assert_same(init_weights.read_weights(path), host_state(4).ema_params)
  assert any('step 6' in r.getMessage() and 'damaged' in r.getMessage() for r in caplog.records)
  assert os.path.isdir(step_dir(workdir, 6))  # reading weights moves nothing
  rd = run_dir.RunDir(str(os.path.join(workdir, 'other_run')), config())
  assert_same(rd.init_params(workdir, template().params), host_state(4).ema_params)
