"""Starts a multi-process JAX job on this machine, for testing multi-host code without a cluster.

  python -m tools.launch_local --processes=2 --devices_per_process=2 -- --config=configs/demo.py --workdir=runs/mp

Every process runs `train.py` (or --script) with the flags after `--`, on CPU with `--devices_per_process`
simulated devices, joined through JAX's distributed runtime (coordinator on localhost, gloo collectives).
Output lines are prefixed with the process id. The launcher waits for all processes; when one exits with an
error the others are stopped, and the launcher exits with that process's code.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def child_env(process_id: int, processes: int, devices_per_process: int, port: int,
              base: Optional[dict] = None) -> dict:
  """The environment of one process: its place in the job and its simulated CPU devices."""
  env = dict(os.environ if base is None else base)
  xla_flags = [f for f in env.get('XLA_FLAGS', '').split() if 'xla_force_host_platform_device_count' not in f]
  env.update({
      'JAX_COORDINATOR_ADDRESS': f'localhost:{port}',
      'JAX_NUM_PROCESSES': str(processes),
      'JAX_PROCESS_ID': str(process_id),
      'XLA_FLAGS': ' '.join(xla_flags + [f'--xla_force_host_platform_device_count={devices_per_process}']),
      'JAX_PLATFORMS': env.get('JAX_PLATFORMS') or 'cpu',
      'PYTHONUNBUFFERED': '1',
  })
  return env


def _pump(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ''):
    out.write(prefix + line)
    out.flush()
  stream.close()


def _stop(procs: List[subprocess.Popen], grace_s: float = 10.0) -> None:
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  end = time.time() + grace_s
  for p in procs:
    try:
      p.wait(max(0.1, end - time.time()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def launch(args: List[str], processes: int, devices_per_process: int, script: str = 'train.py',
           timeout_s: Optional[float] = None, port: Optional[int] = None, out=None,
           env: Optional[dict] = None) -> int:
  """Runs `processes` copies of `script args`; returns 0, or the first failing process's exit code.

  `env`: variables added to this process's environment for the children.
  """
  if processes < 1 or devices_per_process < 1:
    raise ValueError(f'processes ({processes}) and devices_per_process ({devices_per_process}) must be >= 1')
  out = out or sys.stdout
  port = port or free_port()
  script = script if os.path.isabs(script) else os.path.join(REPO_ROOT, script)
  procs, pumps = [], []
  for i in range(processes):
    p = subprocess.Popen([sys.executable, script] + list(args),
                         env=child_env(i, processes, devices_per_process, port, {**os.environ, **(env or {})}),
                         cwd=REPO_ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    procs.append(p)
    pumps.append(threading.Thread(target=_pump, args=(p.stdout, f'[p{i}] ', out), daemon=True))
    pumps[-1].start()
  start, code = time.time(), 0
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        out.write(f'[launch_local] process {i} exited with code {code}; stopping the others.\n')
        break
      if all(c == 0 for c in codes):
        break
      if timeout_s and time.time() - start > timeout_s:
        out.write(f'[launch_local] timed out after {timeout_s:.0f}s; stopping all processes.\n')
        code = 124
        break
      time.sleep(0.2)
  except KeyboardInterrupt:
    code = 130
  finally:
    _stop(procs)
    for t in pumps:
      t.join(5)
  return code


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  ours, rest = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=2)
  parser.add_argument('--script', default='train.py', help='Python script every process runs.')
  parser.add_argument('--timeout', type=float, default=None, help='Stop everything after this many seconds.')
  parser.add_argument('--port', type=int, default=None, help='Coordinator port (default: a free one).')
  opts = parser.parse_args(ours)
  return launch(rest, opts.processes, opts.devices_per_process, opts.script, opts.timeout, opts.port)


if __name__ == '__main__':
  sys.exit(main())
