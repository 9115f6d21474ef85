"""Faults while writing a run directory end in one `error:` line and lose nothing (nfnets/console.py):
a disk that fills during a checkpoint write (exit 74), a resume whose architecture differs from the
checkpoints (exit 2), a read-only workdir (exit 74). train.py runs as the user runs it; the full disk is
simulated by making orbax's checkpoint writer raise OSError(ENOSPC) at the second save."""
import errno
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from configs import demo
from nfnets import console
from nfnets import run_dir
from cli_helpers import ENV, ROOT, TRAIN, error_line, run_tool

# train.py with its checkpoint writer failing as a full disk does, from the `FAIL_AT_SAVE`-th save on.
FULL_DISK_TRAIN = textwrap.dedent('''
    import errno, os, sys
    import orbax.checkpoint as ocp
    sys.path.insert(0, os.environ['REPO'])
    sys.argv[0] = 'train.py'
    fail_at, calls = int(os.environ['FAIL_AT_SAVE']), []
    write = ocp.StandardCheckpointHandler.async_save

    async def full_disk(self, directory, *args, **kwargs):
      calls.append(directory)
      if len(calls) >= fail_at:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
      return await write(self, directory, *args, **kwargs)

    ocp.StandardCheckpointHandler.async_save = full_disk
    import train
    train.cli()
''')


def steps_on_disk(workdir):
  return sorted(os.listdir(os.path.join(workdir, 'checkpoints')))


@pytest.fixture(scope='module')
def full_disk_run(tmp_path_factory):
  """A run whose disk fills during its second checkpoint write (step 2 of 4; step 1 is written)."""
  workdir = str(tmp_path_factory.mktemp('full') / 'run')
  script = tmp_path_factory.mktemp('script') / 'full_disk_train.py'
  script.write_text(FULL_DISK_TRAIN)
  proc = subprocess.run([sys.executable, str(script), '--config=configs/demo.py', f'--workdir={workdir}',
                         *TRAIN, '--config.checkpoint_every=1', '--config.model.depths=(1,2,1,1)'],
                        cwd=ROOT, env=dict(ENV, REPO=ROOT, FAIL_AT_SAVE='2'), capture_output=True, text=True,
                        timeout=600)
  return workdir, proc


def test_full_disk_ends_in_one_line_and_keeps_the_written_checkpoint(full_disk_run):
  workdir, proc = full_disk_run
  line = error_line(proc, console.STORAGE_ERROR_EXIT)
  assert line.startswith(f'error: {workdir}/checkpoints/2: no space left on the device while writing the '
                         'checkpoint of step 2;'), line
  assert 'intact (newest: step 1)' in line and 'rerun the same command' in line
  # Step 1 is whole; step 2 never became a step. Orbax creates its temporary folder on a background
  # thread, so the failed write may or may not have left one; it is never listed as a step.
  assert steps_on_disk(workdir) in (['1'], ['1', '2.orbax-checkpoint-tmp'])
  config = demo.get_config()
  config.model.depths = (1, 2, 1, 1)
  io = run_dir.RunDir(workdir, config)
  assert io.manager.all_steps() == [1]
  # The next start removes the unfinished folder (orbax's cleanup runs in the background).
  deadline = time.time() + 60
  while steps_on_disk(workdir) != ['1'] and time.time() < deadline:
    time.sleep(0.2)
  assert steps_on_disk(workdir) == ['1']
  io.close()


def test_resume_with_another_architecture_is_a_user_error(full_disk_run):
  workdir, _ = full_disk_run
  before = steps_on_disk(workdir)
  proc = run_tool('train.py', f'--workdir={workdir}', '--config.model.depths=(1,1,1,1)')
  line = error_line(proc, console.USER_ERROR_EXIT)
  assert f'{workdir}/checkpoints/1 is incompatible with this config' in line, line
  assert 'other names/shapes' in line and 'Use another --workdir' in line
  assert steps_on_disk(workdir) == before


def _make_read_only(path):
  """Read-only for this process: immutable (chattr) when root, whom permissions do not stop; else chmod.
  Returns the undo function, or None when neither works here."""
  if os.geteuid() == 0:
    if shutil.which('chattr') and subprocess.run(['chattr', '-R', '+i', path], capture_output=True).returncode == 0:
      return lambda: subprocess.run(['chattr', '-R', '-i', path], check=True)
    return None
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      os.chmod(os.path.join(root, name), 0o555 if name in dirs else 0o444)
  os.chmod(path, 0o555)
  return lambda: subprocess.run(['chmod', '-R', 'u+w', path], check=True)


def test_read_only_workdir_ends_in_one_line(full_disk_run):
  workdir, _ = full_disk_run
  before = {name: os.path.getmtime(os.path.join(workdir, 'checkpoints', name)) for name in steps_on_disk(workdir)}
  undo = _make_read_only(workdir)
  if undo is None:
    pytest.skip('cannot make a folder read-only here (root without chattr)')
  try:
    proc = run_tool('train.py', f'--workdir={workdir}')
  finally:
    undo()
  line = error_line(proc, console.STORAGE_ERROR_EXIT)
  assert line.startswith(f'error: {workdir}/config.json: '), line
  assert any(why in line for why in ('read-only', 'not permitted', 'permission denied')), line
  assert f'make {workdir} writable' in line
  assert {name: os.path.getmtime(os.path.join(workdir, 'checkpoints', name))
          for name in steps_on_disk(workdir)} == before


def test_storage_errno_reads_orbax_and_os_errors():
  """orbax raises a full disk as tensorstore's ValueError with the OS error code in its text."""
  orbax_error = ValueError('RESOURCE_EXHAUSTED: Error writing "a/0" in OCDBT database at local file '
                           '"/x/4.orbax-checkpoint-tmp/state/": Failed writing: "/x/4.orbax-checkpoint-tmp/d/1": '
                           "Failed to write 9 bytes: No space left on device [os_error_code='28']")
  assert console.storage_errno(orbax_error) == errno.ENOSPC
  assert console.fault_path(orbax_error) == '/x/4.orbax-checkpoint-tmp/d/1'   # the file that failed
  try:
    raise RuntimeError('wrapped') from OSError(errno.EROFS, 'Read-only file system', '/ro/config.json')
  except RuntimeError as e:
    assert console.storage_errno(e) == errno.EROFS and console.fault_path(e) == '/ro/config.json'
  assert console.storage_errno(FileNotFoundError(errno.ENOENT, 'x')) is None
  assert console.storage_errno(ValueError('RESOURCE_EXHAUSTED: out of memory')) is None
