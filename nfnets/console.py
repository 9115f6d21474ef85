"""The console: this project's INFO lines (progress, evals, checkpoints) and everyone's warnings.

Orbax logs every checkpoint step at INFO through absl, and TensorFlow prints INFO lines from C++ when it
loads; in a short demo run they are most of the console. `configure(verbosity)` keeps them out by default.
"""
import logging as std_logging
import os
import re
import sys
import tempfile

from absl import logging

USER_ERROR_EXIT = 2  # the exit status of every command on a user error (bad flag, value or file)
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TensorFlow's import-time lines that are not INFO records themselves.
_TF_INFO_PREFIXES = ('WARNING: All log messages before absl::InitializeLog()',
                     'To enable the following instructions:')


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
    return record.levelno >= std_logging.WARNING or self.is_project_file(record.pathname)


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
    import_tensorflow_quietly()


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow (the input pipeline and TensorBoard need it) without its import-time C++ INFO lines.

  Loading its libraries logs a oneDNN notice twice, each after a line saying absl's C++ logging is not
  initialised; TF_CPP_MIN_LOG_LEVEL does not reach them. stderr is captured during the import and every
  other line (warnings, errors) is written back.
  """
  if 'tensorflow' in sys.modules:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode='w+b') as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors='replace').splitlines(keepends=True):
        if not (re.match(r'I\d{4} ', line) or line.startswith(_TF_INFO_PREFIXES)):
          sys.stderr.write(line)
      sys.stderr.flush()


def user_error(problems) -> int:
  """Prints a user error as `error: <line>` lines on stderr (one per problem, or the first line of an
  exception's message) and returns the exit status for it, `USER_ERROR_EXIT`. No traceback."""
  if isinstance(problems, BaseException):
    text = str(problems).strip()
    problems = [text.splitlines()[0] if text else type(problems).__name__]
  for line in [problems] if isinstance(problems, str) else problems:
    print(f'error: {line}', file=sys.stderr)
  sys.stderr.flush()
  return USER_ERROR_EXIT
