"""User-facing errors.

Anything raised as a `UserError` is printed by the command-line tools as one
clear message (no traceback) and ends the process with exit code 2.
"""


class UserError(Exception):
  """An error caused by the user's input: data, flags or files."""


class DataError(UserError):
  """An embeddings / images file is missing, unreadable or malformed."""


class ConfigError(UserError):
  """A flag or configuration value is invalid or inconsistent."""
