"""The one exception type for problems a user can fix (bad config, bad file, bad data).

Command-line entry points catch it and print its message as one line (exit status 2 for
configuration errors); internal invariants use ``assert``/chex and may show tracebacks.
"""

import argparse
import importlib
import types

# Packages outside the base install -> the extra of pyproject.toml that provides them.
OPTIONAL_EXTRAS = {"torch": "test", "accelerate": "test"}


class UserError(Exception):
    """A configuration, file or data problem, with a message naming what and where."""


class ConfigError(UserError):
    """A bad experiment name, override key, value type or range."""


class ArgumentParser(argparse.ArgumentParser):
    """The command lines' parser: a bad argument raises `error_type` (a `UserError`) with argparse's message,
    which the entry point prints as one line (exit 2), instead of argparse's usage dump and exit."""

    error_type: type[UserError] = UserError

    def error(self, message: str):
        raise self.error_type(message)


def require(module: str, needed_for: str) -> types.ModuleType:
    """Import and return the optional package `module`; a one-line `UserError` when it is not installed.

    e.g. `require("torch", "the 'llama' tokenizer of model.gguf")` raises
    "torch is not installed; it is needed for the 'llama' tokenizer of model.gguf: pip install -e '.[test]'".
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing != module and not module.startswith(missing + "."):
            raise  # `module` is installed but one of its own imports is broken: show that
        extra = OPTIONAL_EXTRAS.get(module.partition(".")[0])
        hint = f"pip install -e '.[{extra}]'" if extra else f"pip install {module.partition('.')[0]}"
        raise UserError(f"{module} is not installed; it is needed for {needed_for}: {hint}") from None
