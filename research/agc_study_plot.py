"""The AGC study's figure: one heat map per AGC setting (no AGC, then each lambda), batch size (rows) x base
LR (columns), the test top-1 written in each cell, on one colour scale shared by every panel.

The paper shows the same study as lines (§4.1, Fig. 2); a grid per lambda reads at a glance here because
the study has three batch sizes and three LRs. A run whose loss became NaN/Inf is a grey cell marked
"NaN@k" (k = the step); a run that failed otherwise or has not finished is a white cell with its status.

`plot_study` returns what it drew, read back from the figure's artists (panel titles, tick labels, cell
texts, colour values), so a test can compare the picture with the rows it was given.
"""
from typing import Dict, Optional, Sequence

import numpy as np

AGC_OFF = 'off'
# Colour by test error (100 - top-1) on a log scale, shared by all panels: 99% vs 95% vs 80% vs chance
# (10%) are all distinct, where a linear top-1 scale would paint everything above 85% the same.
ERROR_RANGE = (0.5, 100.0)
COLORBAR_TOP1 = (99.5, 99, 98, 95, 90, 80, 50, 0)
NAN_COLOR = '0.55'      # diverged
MISSING_COLOR = 'white'  # failed / pending / not in the grid


def agc_title(agc: str) -> str:
  return 'no AGC' if agc == AGC_OFF else f'λ = {agc}'


def cell_label(row: Optional[dict]) -> str:
  """The text of one cell: top-1 % (one decimal), 'NaN@k' for a NaN/Inf divergence at step k, else the
  run's status ('failed', 'pending'); '' for a grid point without a run."""
  if row is None:
    return ''
  if row['status'] == 'done':
    return f"{100 * row['top1']:.1f}"
  if row['status'] == 'diverged':
    step = row.get('diverged_at')
    return f'NaN@{step}' if step is not None else 'NaN'
  return row['status']


def study_grid(rows: Sequence[dict]) -> Dict[str, object]:
  """The values behind the figure: AGC settings (in row order), sorted batches and base LRs, and per AGC
  setting a [batch, lr] array of top-1 % (NaN where the run did not finish) and of cell labels."""
  agcs = list(dict.fromkeys(r['agc'] for r in rows))
  batches = sorted({r['batch'] for r in rows})
  lrs = sorted({r['base_lr'] for r in rows})
  by = {(r['agc'], r['batch'], r['base_lr']): r for r in rows}
  values, labels, status = {}, {}, {}
  for a in agcs:
    v = np.full((len(batches), len(lrs)), np.nan)
    lab = [[''] * len(lrs) for _ in batches]
    st = [[''] * len(lrs) for _ in batches]
    for i, b in enumerate(batches):
      for j, lr in enumerate(lrs):
        r = by.get((a, b, lr))
        lab[i][j] = cell_label(r)
        st[i][j] = r['status'] if r else ''
        if r is not None and r['status'] == 'done':
          v[i, j] = 100 * r['top1']
    values[a], labels[a], status[a] = v, lab, st
  return {'agcs': agcs, 'batches': batches, 'lrs': lrs, 'values': values, 'labels': labels,
          'status': status}


def _lr_text(lr: float) -> str:
  return f'{lr:g}'


def plot_study(path: Optional[str], rows: Sequence[dict], title: str = '') -> Dict[str, object]:
  """Draws the heat maps (written to `path` if given) and returns what the figure shows.

  Returns {'panels': [panel title], 'rows': [y tick label], 'cols': [x tick label], 'text': {panel title:
  [[cell text]] (batch x LR)}, 'top1': {panel title: array of the top-1 % each cell's colour stands for
  (clipped to the scale's 0-99.5), NaN where grey or white}, 'diverged': {panel title: bool array of grey
  cells}, 'scale': {panel title: (vmin, vmax, norm type) of its colours}, 'figure': the figure}.
  Everything but 'figure' is read back from the drawn artists.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import colors as mcolors  # pylint: disable=g-import-not-at-top

  g = study_grid(rows)
  agcs, batches, lrs = g['agcs'], g['batches'], g['lrs']
  norm = mcolors.LogNorm(*ERROR_RANGE)
  cmap = plt.get_cmap('viridis_r').with_extremes(bad=MISSING_COLOR)
  n = len(agcs)
  top = 0.8 if title else 0.35
  fig, axes = plt.subplots(1, n, figsize=(0.6 + 2.25 * n + 0.9, top + 0.55 + 0.62 * len(batches)), dpi=90,
                           squeeze=False, sharey=True)
  axes = axes[0]
  image = None
  for ax, a in zip(axes, agcs):
    err = np.clip(100.0 - g['values'][a], ERROR_RANGE[0], ERROR_RANGE[1])
    image = ax.imshow(np.ma.masked_invalid(err), cmap=cmap, norm=norm, aspect='auto')
    diverged = np.array([[s == 'diverged' for s in line] for line in g['status'][a]], bool)
    if diverged.any():  # grey cells under the divergences
      ax.imshow(np.ma.masked_where(~diverged, np.ones(diverged.shape)),
                cmap=mcolors.ListedColormap([NAN_COLOR]), aspect='auto', gid='diverged')
    for i in range(len(batches)):
      for j in range(len(lrs)):
        text = g['labels'][a][i][j]
        if not text:
          continue
        v = g['values'][a][i, j]
        dark = not np.isnan(v) and norm(max(100.0 - v, ERROR_RANGE[0])) > 0.45
        color = 'white' if dark or diverged[i, j] else 'black'
        ax.text(j, i, text, ha='center', va='center', fontsize=9, color=color,
                fontweight='bold' if diverged[i, j] else 'normal', gid='cell')
    ax.set_title(agc_title(a), fontsize=10)
    ax.set_xticks(range(len(lrs)))
    ax.set_xticklabels([_lr_text(lr) for lr in lrs], fontsize=8)
    ax.set_yticks(range(len(batches)))
    ax.set_yticklabels([str(b) for b in batches], fontsize=8)
    ax.set_xticks(np.arange(len(lrs) + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(batches) + 1) - 0.5, minor=True)
    ax.grid(which='minor', color='white', linewidth=1.5)
    ax.tick_params(which='minor', length=0)
    ax.set_xlabel('base LR (per 256 images)', fontsize=8)
  axes[0].set_ylabel('batch size', fontsize=9)
  w, h = fig.get_figwidth(), fig.get_figheight()
  fig.subplots_adjust(left=0.6 / w, right=1 - 0.95 / w, wspace=0.08, bottom=0.5 / h, top=1 - top / h)
  cax = fig.add_axes([1 - 0.8 / w, 0.5 / h, 0.12 / w, 1 - (0.5 + top) / h])
  bar = fig.colorbar(image, cax=cax)
  bar.set_ticks([max(100.0 - t, ERROR_RANGE[0]) for t in COLORBAR_TOP1])
  bar.set_ticklabels([f'{t:g}' for t in COLORBAR_TOP1])
  bar.minorticks_off()
  bar.ax.invert_yaxis()  # best (smallest error) at the top
  bar.ax.tick_params(labelsize=7)
  bar.set_label('test top-1 %  (grey: NaN@step)', fontsize=8)
  if title:
    fig.suptitle(title + '\npeak LR = base LR × batch / 256', fontsize=9)
  if path:
    fig.savefig(path)
  plt.close(fig)
  return read_back(fig)


def read_back(fig) -> Dict[str, object]:
  """What a `plot_study` figure shows, from its artists: see `plot_study`."""
  axes = [ax for ax in fig.axes if ax.get_title()]
  out = {'panels': [], 'text': {}, 'top1': {}, 'diverged': {}, 'scale': {}, 'figure': fig,
         'rows': [t.get_text() for t in axes[0].get_yticklabels()] if axes else [],
         'cols': [t.get_text() for t in axes[0].get_xticklabels()] if axes else []}
  for ax in axes:
    name = ax.get_title()
    shape = (len(ax.get_yticks(minor=False)), len(ax.get_xticks(minor=False)))
    text = [[''] * shape[1] for _ in range(shape[0])]
    for t in ax.texts:
      if t.get_gid() == 'cell':
        x, y = t.get_position()
        text[int(round(y))][int(round(x))] = t.get_text()
    images = {im.get_gid(): im for im in ax.images}
    heat = next(im for im in ax.images if im.get_gid() != 'diverged')
    err = np.ma.filled(np.ma.asarray(heat.get_array(), float), np.nan)
    grey = images.get('diverged')
    out['panels'].append(name)
    out['text'][name] = text
    out['top1'][name] = 100.0 - err
    out['diverged'][name] = (~np.ma.getmaskarray(grey.get_array()) if grey is not None
                             else np.zeros(shape, bool))
    out['scale'][name] = (heat.norm.vmin, heat.norm.vmax, type(heat.norm).__name__)
  return out
