"""The console of every command: this project's INFO lines (progress, evals, checkpoints), everyone's
warnings, and one error path.

Orbax logs every checkpoint step at INFO through absl, and TensorFlow can print INFO lines from C++; in a
short demo run they are most of the console. `configure(verbosity)` keeps them out by default
(`--verbosity=1` shows other libraries' INFO lines, 2 their DEBUG lines). TensorFlow is imported only by
what needs it (the input pipeline, TensorBoard logs), after JAX: jaxlib has then set up absl's C++ logging,
so TensorFlow's import-time notices do not reach the console, and a command that fails on its flags never
pays the seconds its import takes.

Every command runs its absl `main` through `run`, which ends every failure it can name in one line:
  exit 2   (`USER_ERROR_EXIT`): a user error: a bad flag, value, config field or input file; the line
           names the value and what is accepted.
  exit 3   (`DIVERGED_EXIT`, train.py): the loss or gradient became NaN/Inf; the last good checkpoint is kept.
  exit 74  (`STORAGE_ERROR_EXIT`, sysexits' EX_IOERR): the storage refused a write: a full disk or quota,
           a read-only file system, no permission, an I/O error. The line names the path, what happened and
           what to do; nothing written before is lost (a run resumes from its newest intact checkpoint).
Anything else is a bug and keeps its traceback.
"""
import errno
import logging as std_logging
import os
import re
import sys
from typing import Callable, Optional, Sequence, Type

from absl import app
from absl import flags
from absl import logging

USER_ERROR_EXIT = 2  # the exit status of every command on a user error (bad flag, value or file)
DIVERGED_EXIT = 3  # train.py: the loss or gradient became NaN/Inf (the sweep records the run as diverged)
STORAGE_ERROR_EXIT = 74  # the exit status when the storage refuses a write (sysexits.h EX_IOERR)
# The faults of the storage itself, not of the command line: what each means for the user.
STORAGE_ERRNOS = {
    errno.ENOSPC: 'no space left on the device',
    errno.EDQUOT: 'the disk quota is exceeded',
    errno.EROFS: 'the file system is read-only',
    errno.EACCES: 'permission denied (read-only for this user)',
    errno.EPERM: 'operation not permitted (read-only or immutable)',
    errno.EIO: 'an input/output error of the device',
}
# orbax raises tensorstore's write errors as ValueError('RESOURCE_EXHAUSTED: ... [os_error_code=28]').
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_QUOTED_PATH = re.compile(r'(?:Failed writing|local file): "([^"]+)"')
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ProjectLogFilter(std_logging.Filter):
  """Passes WARNING and above from anyone, and lower levels only from this project's own files (not from
  installed packages such as orbax, which logs every checkpoint step at INFO through absl)."""

  def __init__(self, root: str = PROJECT_ROOT):
    super().__init__()
    self.root = os.path.abspath(root)

  def is_project_file(self, path: str) -> bool:
    path = os.path.abspath(path)
    if not path.startswith(self.root + os.sep):
      return False
    parts = os.path.relpath(path, self.root).split(os.sep)[:-1]
    return not any(p in ('site-packages', 'dist-packages') or p.startswith('.') for p in parts)

  def filter(self, record: std_logging.LogRecord) -> bool:
    if self.is_project_file(record.pathname):
      return True
    if _reports_storage_fault(record):  # reported once, by the project's own line (see `run`)
      return False
    return record.levelno >= std_logging.WARNING


def _reports_storage_fault(record: std_logging.LogRecord) -> bool:
  """A third-party record about a storage fault: orbax's writer threads log every failed write of a
  checkpoint (with tracebacks) before the error reaches the command, which reports it in one line."""
  if record.exc_info and storage_errno(record.exc_info[1]) is not None:
    return True
  match = _OS_ERROR_CODE.search(record.getMessage())
  return bool(match) and int(match.group(1)) in STORAGE_ERRNOS


def configure(verbosity: int = 0) -> None:
  """0: the project's INFO lines and everyone's warnings; 1: everyone's INFO; 2: DEBUG too; < 0: absl's
  own levels (warnings and up)."""
  if verbosity < 0:
    return                               # absl: WARNING (-1) and up only
  if verbosity <= 1:
    logging.set_verbosity(logging.INFO)
  if verbosity == 0:
    logging.get_absl_handler().addFilter(ProjectLogFilter())
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')   # TensorFlow's C++ INFO lines


def error_summary(error: BaseException) -> str:
  """`Type: message` on one line, cut at 300 characters (for a warning that names a failure)."""
  text = ' '.join(str(error).split())
  return f'{type(error).__name__}: {text[:300]}' + (' ...' if len(text) > 300 else '')


def user_error(problems) -> int:
  """Prints a user error as `error: <line>` lines on stderr (one per problem, or the first line of an
  exception's message) and returns the exit status for it, `USER_ERROR_EXIT`. No traceback."""
  if isinstance(getattr(problems, 'problems', None), (list, tuple)):   # a ConfigError: every problem
    problems = list(problems.problems)
  elif isinstance(problems, BaseException):
    text = str(problems).strip()
    problems = [text.splitlines()[0] if text else type(problems).__name__]
  for line in [problems] if isinstance(problems, str) else problems:
    print(f'error: {line}', file=sys.stderr)
  sys.stderr.flush()
  return USER_ERROR_EXIT


# ------------------------------------------------------------------------------------------ storage faults

class StorageFault(OSError):
  """A write the storage refused, carrying its whole one-line report (path, what happened, what to do)."""

  def __init__(self, code: int, report: str):
    super().__init__(code, report)
    self.report = report

  def __str__(self) -> str:
    return self.report


def storage_errno(error: Optional[BaseException]) -> Optional[int]:
  """The errno of a storage fault (`STORAGE_ERRNOS`) in `error` or the errors it was raised from; None when
  it is not one. Reads OSErrors and tensorstore's `os_error_code` (orbax's checkpoint writes)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
      return error.errno
    match = _OS_ERROR_CODE.search(str(error))
    if match and int(match.group(1)) in STORAGE_ERRNOS:
      return int(match.group(1))
    error = error.__cause__ or error.__context__
  return None


def fault_path(error: BaseException) -> Optional[str]:
  """The file a storage fault was about (an OSError's filename, or the file in tensorstore's message)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.filename:
      return os.fspath(error.filename)
    match = _QUOTED_PATH.search(str(error))
    if match:
      return match.group(1)
    error = error.__cause__ or error.__context__
  return None


def storage_error(error: BaseException) -> int:
  """Prints a storage fault as one `error:` line on stderr; returns `STORAGE_ERROR_EXIT`."""
  if isinstance(error, StorageFault):
    line = error.report
  else:
    code = storage_errno(error)
    path = fault_path(error) or 'a file'
    line = (f'cannot write {path}: {STORAGE_ERRNOS.get(code, os.strerror(code or 0))}. Free space or make it '
            'writable (or write elsewhere), then rerun the command.')
  print(f'error: {line}', file=sys.stderr)
  sys.stderr.flush()
  return STORAGE_ERROR_EXIT


# ------------------------------------------------------------------------------------------ commands

def verbosity_flag() -> int:
  """--verbosity when it was given, else 0 (the project's INFO lines; absl's own default is -1)."""
  return flags.FLAGS.verbosity if flags.FLAGS['verbosity'].present else 0


def run(main: Callable, user_errors: Sequence[Type[BaseException]] = (), flags_parser=None,
        argv: Optional[Sequence[str]] = None) -> None:
  """`absl.app.run(main)` with the project's console and error path (see the module docstring).

  Args:
    user_errors: exception types that are user errors: printed as `error: <first line>`, exit 2.
    flags_parser: absl's `flags_parser` (e.g. `nfnets.run_config.parse_flags` for commands with --config).
  """
  def main_with_console(args):
    configure(verbosity_flag())
    try:
      return main(args)
    except Exception as e:  # pylint: disable=broad-except
      if storage_errno(e) is not None:  # first: orbax raises a full disk as a ValueError
        code = storage_error(e)
        # Ends the process now: after a failed write, orbax's background writer threads wait minutes for
        # signals that never come and print tracebacks at interpreter shutdown. Everything the command
        # wrote before is already closed (the run directory closes its logs and checkpoints first).
        sys.stdout.flush()
        os._exit(code)  # pylint: disable=protected-access
      if isinstance(e, tuple(user_errors)):
        return user_error(e)
      raise

  kwargs = {'flags_parser': flags_parser} if flags_parser is not None else {}
  app.run(main_with_console, argv=list(argv) if argv is not None else None, **kwargs)
