"""Forward+backward time of every conv shape of NFNet-F0 (batch 8, 192 px) under each lowering.

  python -m benchmarks.conv_layers [--impls=xla,split,matmul] [--reps=5] [--filter=g6]

Each shape runs value_and_grad w.r.t. input and kernel; times are medians over --reps, the lowerings
interleaved so machine load hits them alike. Totals weight each shape by how often F0 uses it.
"""
import argparse
import os

import jax
import jax.numpy as jnp

from nfnets import conv as conv_lib
from nfnets.cpu import tuning

B = 8
# (name, H_in, Cin, Cout, k, stride, groups, count in F0)
F0_CONVS = [
    ('stem0', 192, 3, 16, 3, 2, 1, 1),
    ('stem1', 96, 16, 32, 3, 1, 1, 1),
    ('stem2', 96, 32, 64, 3, 1, 1, 1),
    ('stem3', 96, 64, 128, 3, 2, 1, 1),
    ('s1_c0', 48, 128, 128, 1, 1, 1, 1),
    ('s1_c1', 48, 128, 128, 3, 1, 1, 2),
    ('s1_c2', 48, 128, 256, 1, 1, 1, 2),  # conv2 + shortcut
    ('s2_c0a', 48, 256, 256, 1, 1, 1, 1),
    ('s2_c1a', 48, 256, 256, 3, 2, 2, 1),
    ('s2_c1', 24, 256, 256, 3, 1, 2, 3),
    ('s2_c2', 24, 256, 512, 1, 1, 1, 3),  # 2 conv2 + shortcut
    ('s2_c0', 24, 512, 256, 1, 1, 1, 1),
    ('s3_c0a', 24, 512, 768, 1, 1, 1, 1),
    ('s3_c1a', 24, 768, 768, 3, 2, 6, 1),
    ('s3_c1', 12, 768, 768, 3, 1, 6, 11),
    ('s3_c2', 12, 768, 1536, 1, 1, 1, 6),
    ('s3_sc', 12, 512, 1536, 1, 1, 1, 1),
    ('s3_c0', 12, 1536, 768, 1, 1, 1, 5 + 1),  # 5 in stage 3 + first of stage 4 (at 12 px)
    ('s4_c1a', 12, 768, 768, 3, 2, 6, 1),
    ('s4_c1', 6, 768, 768, 3, 1, 6, 5),
    ('s4_c2', 6, 768, 1536, 1, 1, 1, 3),
    ('s4_sc', 6, 1536, 1536, 1, 1, 1, 1),
    ('s4_c0', 6, 1536, 768, 1, 1, 1, 2),
    ('final', 6, 1536, 3072, 1, 1, 1, 1),
]


def macs(h, cin, cout, k, s, g):
  ho = -(-h // s)
  return B * ho * ho * k * k * cin // g * cout


def make_fn(impl, s, g, part='all'):
  """part: 'all' (value and both grads), 'fwd', 'dx' or 'dw' (value and that gradient only)."""
  def loss(x, w, ct):
    return jnp.vdot(conv_lib.conv2d(x, w, s, 'SAME', g, impl), ct)
  if part == 'fwd':
    return lambda x, w, ct: conv_lib.conv2d(x, w, s, 'SAME', g, impl)
  argnums = {'all': (0, 1), 'dx': 0, 'dw': 1}[part]
  return jax.value_and_grad(loss, argnums=argnums)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--impls', default='xla,split,matmul')
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--filter', default='')
  p.add_argument('--part', default='all', choices=['all', 'fwd', 'dx', 'dw'])
  p.add_argument('--k', type=int, default=0, help='only kernels of this size (0: all)')
  a = p.parse_args()
  impls = a.impls.split(',')
  print(os.popen('uptime').read().strip())
  totals = {i: 0.0 for i in impls}
  for name, h, cin, cout, k, s, g, n in F0_CONVS:
    if (a.filter and a.filter not in name) or (a.k and k != a.k):
      continue
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (B, h, h, cin))
    w = jax.random.normal(key, (k, k, cin // g, cout)) * 0.1
    ho = -(-h // s)
    ct = jax.random.normal(key, (B, ho, ho, cout))
    # Compiled, warmed up, then timed interleaved (median of --reps), as nfnets.tuning measures lowerings.
    ms = tuning.time_candidates({i: make_fn(i, s, g, a.part) for i in impls}, (x, w, ct), repeats=a.reps)
    fl = {'all': 6, 'fwd': 2, 'dx': 4, 'dw': 4}[a.part] * macs(h, cin, cout, k, s, g)
    row = []
    for i in impls:
      t = ms[i] / 1e3
      totals[i] += t * n
      row.append(f'{i} {t * 1e3:7.1f} ms {fl / t / 1e9:6.1f} GF/s')
    print(f'{name:7s} x{n:2d} {h:3d}px {cin:4d}->{cout:4d} k{k} s{s} g{g}: ' + ' | '.join(row), flush=True)
  print('weighted total: ' + ' | '.join(f'{i} {t:.2f} s' for i, t in totals.items()))
  print(os.popen('uptime').read().strip())


if __name__ == '__main__':
  main()
