"""The one exception type for problems a user can fix (bad config, bad file, bad data).

Command-line entry points catch it and print its message as one line (exit status 2 for
configuration errors); internal invariants use ``assert``/chex and may show tracebacks.
"""


class UserError(Exception):
    """A configuration, file or data problem, with a message naming what and where."""


class ConfigError(UserError):
    """A bad experiment name, override key, value type or range."""
