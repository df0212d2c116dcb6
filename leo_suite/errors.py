"""User-facing errors, and one-line messages for environment failures.

Anything raised as a `UserError` is printed by the command-line tools as one
clear message (no traceback) and ends the process with exit code 2.
"""


import errno


class UserError(Exception):
  """An error caused by the user's input: data, flags or files."""


class DataError(UserError):
  """An embeddings / images file is missing, unreadable or malformed."""


class ConfigError(UserError):
  """A flag or configuration value is invalid or inconsistent."""


def environment_error(exc, where, recovery, location_flag):
  """One line for a disk-full / permission / I/O failure, else None (a bug).

  `where` is the default location to name, `recovery` what the user can rely
  on (every writer here is atomic), `location_flag` the flag choosing where to
  write. TF errors that are not about the file system return None so their
  traceback is kept.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  text = str(exc)
  code = getattr(exc, "errno", None)
  disk_full = (code == errno.ENOSPC or "No space left" in text or
               (isinstance(exc, tf.errors.ResourceExhaustedError) and "space" in text))
  denied = (code in (errno.EACCES, errno.EPERM, errno.EROFS) or
            isinstance(exc, tf.errors.PermissionDeniedError) or "Read-only file system" in text)
  if not (disk_full or denied or isinstance(exc, OSError)):
    return None
  path = getattr(exc, "filename", None) or where
  detail = getattr(exc, "strerror", None) or " ".join(text.split())[:300]
  if disk_full:
    advice = f"the disk is full: free some space (or choose another {location_flag})"
  elif denied:
    advice = f"no permission to write there: choose a writable {location_flag}"
  else:
    advice = "an I/O error occurred"
  return f"{path}: {detail}; {advice}. {recovery}"
