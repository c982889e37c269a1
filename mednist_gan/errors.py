"""Exceptions the command line turns into one clear line and a non-zero exit."""


class MednistGanError(Exception):
    """Base class: an error reported as one line without a traceback (``--debug`` shows it)."""

    exit_code = 2  # bad input: config, data, checkpoints, arguments


class ConfigError(MednistGanError):
    """A configuration file, key or value is not acceptable."""


class DataError(MednistGanError):
    """The image folder or one of its files cannot be used."""


class CheckpointError(MednistGanError):
    """A checkpoint or exported model cannot be loaded."""


class OutputError(MednistGanError):
    """A destination (run directory, export folder, output file) cannot be created or written."""


def output_error(what: str, path, exc: OSError) -> OutputError:
    """``<what> <path>: cannot be created or written (<reason>)`` for an OSError raised while writing there."""
    reason = exc.strerror or first_line(exc, 120) or type(exc).__name__
    return OutputError(f"{what} {path}: cannot be created or written ({reason})")


class TrainingError(MednistGanError):
    """Training cannot go on (a non-finite loss, a lost process, a failed save); checkpoints are intact."""

    exit_code = 1


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message, cut to ``limit`` characters ("" if none)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), "")[:limit]
