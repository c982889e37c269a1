"""A trained generator outside training: loading every format, the exporters, ``generate``."""
