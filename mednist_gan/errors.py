"""Exceptions the command line turns into one clear line and a non-zero exit."""


class MednistGanError(Exception):
    """Base class: an error caused by the user's input, reported without a traceback."""


class ConfigError(MednistGanError):
    """A configuration file, key or value is not acceptable."""


class DataError(MednistGanError):
    """The image folder or one of its files cannot be used."""


class CheckpointError(MednistGanError):
    """A checkpoint or exported model cannot be loaded."""
