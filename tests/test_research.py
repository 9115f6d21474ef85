"""Research tools: sweep grid/resume/summary (with a fake train script, no training), the AGC study's grid,
table and heat maps (read back from the drawn figure)."""
import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from research import agc_study
from research import sweep_grid
from research import sweep_runs
from research import sweep_summary

DEMO = os.path.join(sweep_grid.REPO_ROOT, 'configs', 'demo.py')

# Stands in for train.py where a run's outcome is not the subject: logs a final eval whose top1 encodes the
# run, crashes on request, and counts its invocations. Divergence is detected on the real train.py
# (test_sweep_detects_a_real_divergence).
FAKE_TRAIN = textwrap.dedent('''
    import json, os, sys
    args = dict(a[2:].split('=', 1) for a in sys.argv[1:])
    wd = args['workdir']
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(os.path.dirname(wd), 'calls.txt'), 'a') as f:
      f.write(os.path.basename(wd) + '\\n')
    clip = float(args.get('config.optimizer.agc.clipping', 0.01))
    batch = int(args.get('config.batch_size', 128))
    steps = int(args.get('config.training_steps', 2000))
    if clip == 0.16:
      print('Traceback (most recent call last):\\nRuntimeError: simulated crash', file=sys.stderr)
      sys.exit(3)
    with open(os.path.join(wd, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps({'step': steps, 'kind': 'train', 'loss': 0.5, 'top1': 0.9, 'grad_norm': 2.0,
                          'clip_fraction': 0.1, 'images_per_sec': 100.0}) + '\\n')
      f.write(json.dumps({'step': steps, 'kind': 'eval', 'top1': 1 - clip - batch / 1e4, 'top5': 1.0,
                          'loss': 0.3, 'ema_top1': 0.5, 'num_examples': 360}) + '\\n')
''')


@pytest.fixture
def fake_train(tmp_path):
  path = tmp_path / 'fake_train.py'
  path.write_text(FAKE_TRAIN)
  return str(path)


def _calls(workdir):
  path = os.path.join(workdir, 'calls.txt')
  return open(path).read().split() if os.path.exists(path) else []


def test_grid_expansion_names_and_validation(tmp_path):
  axes = [sweep_grid.parse_sweep_flag('optimizer.agc.clipping=0.01,0.02,0.04'),
          sweep_grid.parse_sweep_flag('batch_size=256,1024')]
  points = sweep_grid.grid(*axes)
  assert len(points) == 6
  assert points[:2] == [{'optimizer.agc.clipping': '0.01', 'batch_size': '256'},
                        {'optimizer.agc.clipping': '0.01', 'batch_size': '1024'}]  # last axis fastest
  runs = sweep_grid.make_runs(DEMO, str(tmp_path), points, fixed={'training_steps': 7})
  assert [r.name for r in runs][:2] == ['optimizer.agc.clipping=0.01,batch_size=256',
                                        'optimizer.agc.clipping=0.01,batch_size=1024']
  assert len({r.workdir for r in runs}) == 6 and all(r.training_steps == 7 for r in runs)
  assert runs[0].overrides == {'training_steps': '7', 'optimizer.agc.clipping': '0.01', 'batch_size': '256'}
  cmd = sweep_runs.train_command(runs[0], DEMO)
  assert cmd[2:] == [f'--workdir={runs[0].workdir}', f'--config={DEMO}', '--config.training_steps=7',
                     '--config.optimizer.agc.clipping=0.01', '--config.batch_size=256']
  # The resolved config is what train.py would parse.
  config = sweep_grid.resolve_config(DEMO, runs[0].overrides)
  assert config.batch_size == 256 and config.optimizer.agc.clipping == 0.01
  # An axis may set several fields at once (the AGC study's "off | lambda" axis).
  mixed = sweep_grid.grid(agc_study.agc_axis([0.01]), [{'batch_size': '64'}])
  assert mixed == [{'optimizer.agc.enabled': 'False', 'batch_size': '64'},
                   {'optimizer.agc.enabled': 'True', 'optimizer.agc.clipping': '0.01', 'batch_size': '64'}]


@pytest.mark.parametrize('spec, message', [
    ('optimizer.agc.clip=0.01,0.02', "no field 'optimizer.agc.clip'.*did you mean optimizer.agc.clipping"),
    ('nonexistent=1', "no field 'nonexistent'"),
    ('batch_size=', 'empty value list'),
    ('batch_size=256,,1024', 'empty value'),
    ('batch_size=256,256', 'repeats a value'),
    ('batch_size', 'expected FIELD=V1,V2'),
    ('batch_size=big', 'batch_size=big'),
])
def test_bad_sweeps_fail_before_anything_runs(tmp_path, spec, message):
  with pytest.raises(sweep_grid.SweepError, match=message):
    sweep_grid.make_runs(DEMO, str(tmp_path), sweep_grid.grid(sweep_grid.parse_sweep_flag(spec)))
  assert not os.listdir(tmp_path)


def test_bad_fixed_override_and_config(tmp_path):
  with pytest.raises(sweep_grid.SweepError, match="no field 'model.widht'"):
    sweep_grid.make_runs(DEMO, str(tmp_path), [{}], fixed={'model.widht': 2})
  with pytest.raises(sweep_grid.SweepError, match='both fixed and swept'):
    sweep_grid.make_runs(DEMO, str(tmp_path), sweep_grid.grid(sweep_grid.axis('batch_size', [1, 2])),
                    fixed={'batch_size': 4})
  with pytest.raises(sweep_grid.SweepError, match='does not exist'):
    sweep_grid.make_runs(str(tmp_path / 'nope.py'), str(tmp_path), [{}])


def test_cli_reports_bad_field_and_prints_commands(tmp_path):
  from cli_helpers import ENV as env  # pylint: disable=g-import-not-at-top
  cli = [sys.executable, '-m', 'research.sweep', f'--config={DEMO}',
         f'--workdir={tmp_path}']
  bad = subprocess.run(cli + ['--sweep=optimizer.agc.nope=1,2'], capture_output=True, text=True, env=env, cwd=sweep_grid.REPO_ROOT)
  assert bad.returncode == 2 and "no field 'optimizer.agc.nope'" in bad.stderr
  ok = subprocess.run(cli + ['--sweep=batch_size=256,1024', '--config.training_steps=3', '--print_commands'],
                      capture_output=True, text=True, env=env, cwd=sweep_grid.REPO_ROOT)
  assert ok.returncode == 0, ok.stderr
  lines = ok.stdout.strip().splitlines()
  assert len(lines) == 2 and all('train.py' in l and '--config.training_steps=3' in l for l in lines)
  assert '--config.batch_size=1024' in lines[1] and lines[1].endswith("batch_size=1024/DONE")


def test_sweep_runs_resumes_and_isolates_failures(tmp_path, fake_train):
  wd = str(tmp_path / 'sweep')
  points = sweep_grid.grid(sweep_grid.axis('optimizer.agc.clipping', [0.01, 0.08, 0.16]), sweep_grid.axis('batch_size', [256, 1024]))
  runs = sweep_grid.make_runs(DEMO, wd, points, fixed={'training_steps': 5})
  results = sweep_runs.run_sweep(runs, DEMO, parallel=3, train_script=fake_train, log=lambda *_: None)
  status = {r.run.name: r.status for r in results}
  assert status == {
      'optimizer.agc.clipping=0.01,batch_size=256': 'done',
      'optimizer.agc.clipping=0.01,batch_size=1024': 'done',
      'optimizer.agc.clipping=0.08,batch_size=256': 'done',
      'optimizer.agc.clipping=0.08,batch_size=1024': 'done',
      'optimizer.agc.clipping=0.16,batch_size=256': 'failed',
      'optimizer.agc.clipping=0.16,batch_size=1024': 'failed'}
  crashed = next(r for r in results if r.status == 'failed')
  assert crashed.returncode == 3 and 'simulated crash' in crashed.stderr_tail
  assert len(_calls(wd)) == 6
  # Resume: nothing finished or failed runs again; an interrupted run (no marker, no final eval) does.
  os.remove(os.path.join(runs[0].workdir, sweep_runs.DONE_MARKER))
  os.remove(os.path.join(runs[0].workdir, 'metrics.jsonl'))
  again = sweep_runs.run_sweep(runs, DEMO, parallel=2, train_script=fake_train, log=lambda *_: None)
  assert _calls(wd)[6:] == [runs[0].name]
  assert [r.skipped for r in again] == [False] + [True] * 5
  # A run whose metrics show a final eval counts as done even without the DONE marker (cluster runs).
  os.remove(os.path.join(runs[1].workdir, sweep_runs.DONE_MARKER))
  assert sweep_runs.run_state(runs[1]).status == 'done'
  # --retry_failed reruns only the failed ones.
  sweep_runs.run_sweep(runs, DEMO, retry_failed=True, train_script=fake_train, log=lambda *_: None)
  assert sorted(_calls(wd)[7:]) == sorted(r.name for r in runs if 'clipping=0.16' in r.name)
  # The summary marks the failures and keeps the finished results.
  rows = sweep_summary.write_summary(wd, runs)
  by = {r['run']: r for r in rows}
  assert by['optimizer.agc.clipping=0.16,batch_size=256']['status'] == 'failed'
  assert by['optimizer.agc.clipping=0.16,batch_size=256']['returncode'] == 3
  assert 'simulated crash' in by['optimizer.agc.clipping=0.16,batch_size=256']['error']
  assert by['optimizer.agc.clipping=0.16,batch_size=256']['top1'] is None
  assert by['optimizer.agc.clipping=0.01,batch_size=1024']['top1'] == pytest.approx(1 - 0.01 - 0.1024)


def test_progress_is_the_newest_train_record(tmp_path):
  (run,) = sweep_grid.make_runs(DEMO, str(tmp_path), [{}], fixed={'training_steps': 40})
  assert sweep_runs.progress(run) is None   # nothing logged yet
  _fake_run(run, step=30)                   # 30 train records, then a line cut short
  assert sweep_runs.progress(run) == 'step 30/40 | loss 0.0333 | top1 50.00%'


def test_sweep_detects_a_real_divergence(tmp_path):
  """The real train.py on weights with an Inf: its NaN guard stops the run at step 0 with one `error:` line
  and exit status 3, which the sweep records as diverged (not failed), with the step."""
  from cli_helpers import ENV, TRAIN  # pylint: disable=g-import-not-at-top
  from nfnets import console, weights  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  params = {m: {n: rng.normal(0, 0.1, shape).astype(np.float32) for n, shape in ps.items()}
            for m, ps in weights.expected_shapes('nfnet_tiny', 10).items()}
  params['NFNet/~/stem_conv0']['w'][0, 0, 0, 0] = np.inf
  weights.export_npz(params, tmp_path / 'inf.npz')
  fixed = dict(flag[len('--config.'):].split('=', 1) for flag in TRAIN)
  fixed['init_from'] = str(tmp_path / 'inf.npz')
  runs = sweep_grid.make_runs(DEMO, str(tmp_path / 'sweep'), [{}], fixed=fixed)
  (result,) = sweep_runs.run_sweep(runs, DEMO, env=ENV, log=lambda *_: None)
  assert (result.status, result.returncode) == ('diverged', console.DIVERGED_EXIT), result.stderr_tail
  assert result.stderr_tail.splitlines()[-1].startswith('error: Loss or gradient became NaN/Inf at step 0;')
  assert 'Traceback' not in open(os.path.join(runs[0].workdir, sweep_runs.STDERR_LOG)).read()
  (row,) = sweep_summary.write_summary(str(tmp_path / 'sweep'), runs)
  assert row['status'] == 'diverged' and 'NaN/Inf at step 0' in row['error']


def _fake_run(run, top1=None, step=None, failed=None, nan_step=2):
  os.makedirs(run.workdir, exist_ok=True)
  step = run.training_steps if step is None else step
  with open(os.path.join(run.workdir, 'metrics.jsonl'), 'w') as f:
    for s in range(1, step + 1):
      f.write(json.dumps({'step': s, 'kind': 'train', 'loss': 1.0 / s, 'top1': 0.5, 'grad_norm': float(s),
                          'clip_fraction': 0.2, 'images_per_sec': 50.0 + s}) + '\n')
    if top1 is not None:
      f.write(json.dumps({'step': step, 'kind': 'eval', 'top1': top1, 'top5': 1.0, 'loss': 0.2,
                          'ema_top1': top1 - 0.01, 'num_examples': 360}) + '\n')
    f.write('{"step": 99, "kind": "tr')  # a line cut short by a killed writer
  if failed:
    with open(os.path.join(run.workdir, sweep_runs.FAILED_MARKER), 'w') as f:
      json.dump({'status': failed, 'returncode': 1, 'wall_s': 2.0,
                 'stderr_tail': f'x\nerror: Loss or gradient became NaN/Inf at step {nan_step}; training '
                                'stopped.'}, f)


def test_summary_aggregates_fake_run_dirs(tmp_path):
  wd = str(tmp_path)
  points = sweep_grid.grid(sweep_grid.axis('optimizer.agc.clipping', [0.01, 0.04, 0.16]), sweep_grid.axis('batch_size', [256, 1024]))
  runs = sweep_grid.make_runs(DEMO, wd, points, fixed={'training_steps': 4})
  tops = {0: 0.91, 1: 0.85, 2: 0.93, 4: 0.7}
  for i, run in enumerate(runs):
    if i in tops:
      _fake_run(run, tops[i])
  _fake_run(runs[3], failed='diverged', step=2)
  _fake_run(runs[5], step=3)  # interrupted: no final eval, no marker
  rows = sweep_summary.write_summary(wd, runs)
  assert [r['status'] for r in rows] == ['done', 'done', 'done', 'diverged', 'done', 'pending']
  assert [r['top1'] for r in rows] == [0.91, 0.85, 0.93, None, 0.7, None]
  assert rows[0]['ema_top1'] == pytest.approx(0.90)
  assert rows[0]['max_grad_norm'] == 4.0 and rows[0]['last_step'] == 4 and rows[0]['train_loss'] == 0.25
  assert rows[0]['images_per_sec'] == 53.0  # median
  assert rows[3]['last_step'] == 2 and 'NaN/Inf at step 2' in rows[3]['error']
  with open(os.path.join(wd, 'summary.csv')) as f:
    csv_rows = list(csv.DictReader(f))
  assert len(csv_rows) == 6 and csv_rows[2]['optimizer.agc.clipping'] == '0.04'
  assert csv_rows[2]['batch_size'] == '256' and float(csv_rows[2]['top1']) == 0.93
  assert csv_rows[3]['status'] == 'diverged' and csv_rows[3]['top1'] == ''
  md = open(os.path.join(wd, 'summary.md')).read()
  assert md.startswith('# Sweep summary: 6 runs, 4 done, 1 diverged, 1 pending')
  assert md.count('\n| optimizer.agc.clipping=') == 6
  assert os.path.getsize(os.path.join(wd, 'summary.png')) > 10_000
  assert sweep_summary.default_plot_axes(runs) == ('optimizer.agc.clipping', 'batch_size')


def test_agc_study_grid_and_table(tmp_path):
  runs = agc_study.make_study(str(tmp_path), batch_sizes=(64, 1024), base_lrs=(0.4,), clippings=(0.01, 0.16),
                              epochs=10, train_examples=1437)  # digits' train split
  assert [r.name for r in runs] == ['lr=0.4,bs=64,agc=off', 'lr=0.4,bs=64,agc=0.01', 'lr=0.4,bs=64,agc=0.16',
                                    'lr=0.4,bs=1024,agc=off', 'lr=0.4,bs=1024,agc=0.01',
                                    'lr=0.4,bs=1024,agc=0.16']
  assert [r.training_steps for r in runs] == [225] * 3 + [14] * 3  # 10 epochs of 1437 images
  assert runs[3].overrides['optimizer.agc.enabled'] == 'False'
  for run, top1 in zip(runs, [0.8, 0.82, 0.81, None, 0.6, 0.55]):
    _fake_run(run, top1, step=None if top1 else 2, failed=None if top1 else 'diverged')
  rows = agc_study.study_rows(runs)
  assert rows[3]['diverged_at'] == 2 and rows[3]['peak_lr'] == 1.6
  table = agc_study.study_table(rows)
  assert '| 0.4 | 1024 | 1.6 | 14 | NaN@2 | 60.0 | 55.0 |' in table


# Top-1 of each fake run of the plot test, by (base LR, batch, AGC); None = diverged at the step given.
_PLOT_CASES = {
    (0.1, 64, 'off'): 0.951, (0.1, 64, '0.01'): 0.902, (0.1, 64, '0.16'): 0.983,
    (0.1, 1024, 'off'): ('NaN', 7), (0.1, 1024, '0.01'): 0.881, (0.1, 1024, '0.16'): 0.5,
    (0.4, 64, 'off'): ('NaN', 31), (0.4, 64, '0.01'): 0.972, (0.4, 64, '0.16'): 0.994,
    (0.4, 1024, 'off'): ('NaN', 4), (0.4, 1024, '0.01'): 0.686, (0.4, 1024, '0.16'): ('NaN', 19),
}


@pytest.fixture
def study_rows_for_plot(tmp_path):
  """Fake run directories for a 2 LR x 2 batch x (off, 0.01, 0.16) study, and their rows."""
  runs = agc_study.make_study(str(tmp_path / 'study'), batch_sizes=(1024, 64), base_lrs=(0.4, 0.1),
                              clippings=(0.01, 0.16), epochs=5, train_examples=1437)
  for run in runs:
    o = run.overrides
    case = _PLOT_CASES[(float(o['optimizer.base_lr']), int(o['batch_size']), agc_study._agc_label(o))]
    if isinstance(case, tuple):
      _fake_run(run, None, step=case[1], failed='diverged', nan_step=case[1])
    else:
      _fake_run(run, case)
  return agc_study.study_rows(runs)


def test_agc_study_plot_draws_each_row_in_its_cell(tmp_path, study_rows_for_plot):
  """The heat maps, read back from the figure's artists: one panel per AGC setting, batch rows and LR columns
  in ascending order whatever the grid order, each run's top-1 (or NaN@step on grey) in its own cell, one
  colour scale."""
  out = str(tmp_path / 'study.png')
  drawn = agc_study.plot_study(out, study_rows_for_plot, title='test')
  assert 10_000 < os.path.getsize(out) < 300_000
  assert drawn['panels'] == ['no AGC', 'λ = 0.01', 'λ = 0.16']
  assert drawn['rows'] == ['64', '1024'] and drawn['cols'] == ['0.1', '0.4']
  panel = {'off': 'no AGC', '0.01': 'λ = 0.01', '0.16': 'λ = 0.16'}
  for (lr, batch, agc), case in _PLOT_CASES.items():
    i, j, name = [64, 1024].index(batch), [0.1, 0.4].index(lr), panel[agc]
    if isinstance(case, tuple):
      assert drawn['text'][name][i][j] == f'NaN@{case[1]}', (lr, batch, agc)
      assert drawn['diverged'][name][i, j] and np.isnan(drawn['top1'][name][i, j])
    else:
      assert drawn['text'][name][i][j] == f'{100 * case:.1f}', (lr, batch, agc)
      assert not drawn['diverged'][name][i, j]
      assert drawn['top1'][name][i, j] == pytest.approx(min(100 * case, 99.5))  # the scale tops at 99.5
  assert drawn['text']['no AGC'] == [['95.1', 'NaN@31'], ['NaN@7', 'NaN@4']]
  assert len(set(drawn['scale'].values())) == 1  # one colour scale for every panel
  # A missing run leaves its cell empty and white; a failed one says so.
  key = lambda r: (r['base_lr'], r['batch'], r['agc'])
  rows = [dict(r, status='failed', top1=None) if key(r) == (0.1, 64, 'off') else r
          for r in study_rows_for_plot if key(r) != (0.4, 64, '0.01')]
  drawn = agc_study.plot_study(None, rows)
  assert drawn['text']['λ = 0.01'][0] == ['90.2', ''] and drawn['text']['no AGC'][0][0] == 'failed'
  assert np.isnan(drawn['top1']['no AGC'][0, 0]) and not drawn['diverged']['no AGC'][0, 0]


def test_agc_study_table_round_trip_and_from_md(tmp_path, study_rows_for_plot):
  """The markdown table parses back into the rows it came from, so --from_md redraws the same figure."""
  md = 'AGC study, test; test top-1 %, NaN@k: ...\n\n' + agc_study.study_table(study_rows_for_plot)
  parsed = agc_study.parse_table(md)
  keys = ('base_lr', 'batch', 'agc', 'status', 'diverged_at', 'training_steps')
  assert sorted(tuple(r[k] for k in keys) for r in parsed) == sorted(
      tuple(r[k] for k in keys) for r in study_rows_for_plot)
  top1 = {(r['base_lr'], r['batch'], r['agc']): r['top1'] for r in parsed}
  for (lr, batch, agc), case in _PLOT_CASES.items():
    assert top1[(lr, batch, agc)] == (None if isinstance(case, tuple) else pytest.approx(case, abs=5e-4))
  assert agc_study.md_title(md) == 'AGC study, test'
  assert (agc_study.plot_study(None, parsed)['text'] ==
          agc_study.plot_study(None, study_rows_for_plot)['text'])
  with pytest.raises(sweep_grid.SweepError, match='No AGC-study table'):
    agc_study.parse_table('| a | b |\n|---|---|\n| 1 | 2 |')
  # The CLI path, on the committed SGD study's table.
  docs_md = os.path.join(sweep_grid.REPO_ROOT, 'docs', 'agc_study.md')
  out = tmp_path / 'sgd.png'
  cli = [sys.executable, '-m', 'research.agc_study', f'--from_md={docs_md}']
  res = subprocess.run(cli + [f'--out_png={out}'], capture_output=True, text=True, cwd=sweep_grid.REPO_ROOT,
                       timeout=300)
  assert res.returncode == 0, res.stderr
  assert out.stat().st_size > 10_000
  res = subprocess.run(cli, capture_output=True, text=True, cwd=sweep_grid.REPO_ROOT, timeout=300)
  assert res.returncode == 2 and '--from_md needs --out_png' in res.stderr


def test_agc_study_sgd_docs_table_parses():
  """docs/agc_study.md (the SGD study) parses into its 36 cells; two spot checks against the table."""
  with open(os.path.join(sweep_grid.REPO_ROOT, 'docs', 'agc_study.md')) as f:
    rows = agc_study.parse_table(f.read())
  assert len(rows) == 36
  by = {(r['base_lr'], r['batch'], r['agc']): r for r in rows}
  assert by[(0.4, 1024, '0.16')]['status'] == 'diverged' and by[(0.4, 1024, '0.16')]['diverged_at'] == 19
  assert by[(0.4, 64, '0.04')]['top1'] == pytest.approx(0.994)
  drawn = agc_study.plot_study(None, rows)
  assert drawn['text']['λ = 0.16'][2][2] == 'NaN@19' and drawn['text']['λ = 0.04'][0][2] == '99.4'


def test_agc_study_optimizer_defaults():
  """--optimizer=adamw: optimizer.name and decoupled weight decay 0.05 on every run, larger lambdas."""
  d = agc_study.STUDY_DEFAULTS['adamw']
  assert max(d['clippings']) == 0.64 and max(d['base_lrs']) == 0.01
  runs = agc_study.make_study('/nonexistent', batch_sizes=(64,), base_lrs=d['base_lrs'][:1],
                              clippings=(0.64,), fixed=d['fixed'], train_examples=1437)
  assert [r.name for r in runs] == ['lr=0.001,bs=64,agc=off', 'lr=0.001,bs=64,agc=0.64']
  config = sweep_grid.resolve_config(agc_study.CONFIG, runs[1].overrides)
  assert config.optimizer.name == 'adamw' and config.optimizer.weight_decay == 0.05
  assert config.optimizer.agc.clipping == 0.64 and config.optimizer.agc.enabled
  assert agc_study.describe_optimizer(config.optimizer) == 'AdamW, decoupled weight decay 0.05'
  sgd = sweep_grid.resolve_config(agc_study.CONFIG)
  assert agc_study.describe_optimizer(sgd.optimizer) == 'SGD-Nesterov, L2 5e-05'
  assert agc_study.STUDY_DEFAULTS['sgd']['fixed'] == {}  # the SGD study's run directories stay valid


def test_agc_study_model_description_and_set_flag(tmp_path):
  cfg = sweep_grid.resolve_config(agc_study.CONFIG)
  assert agc_study.describe_model(cfg.model) == (
      'nf_resnet26 (depths 1-1-1-1, width 1, skip gains at init 1)')
  cfg = sweep_grid.resolve_config(agc_study.CONFIG, {'model.skip_gain_init': '0'})
  assert agc_study.describe_model(cfg.model) == 'nf_resnet26 (depths 1-1-1-1, width 1)'
  # --set is validated against the config before any run starts.
  cmd = [sys.executable, '-m', 'research.agc_study', f'--workdir={tmp_path}', '--set=model.widht=2']
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=sweep_grid.REPO_ROOT, timeout=300)
  assert out.returncode == 2 and "no field 'model.widht'" in out.stderr
  cmd[-1] = '--set=model.width'
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=sweep_grid.REPO_ROOT, timeout=300)
  assert out.returncode == 2 and "--set takes field=value, got 'model.width'" in out.stderr
  assert not os.listdir(tmp_path)
