"""Typed, validated configuration: dataclass sections (``schema``) loaded from YAML, then dotted overrides (``load``).

Precedence: dataclass defaults < YAML file (and the files it names as ``base``) < ``key=value`` arguments.
``mednist-gan config-help`` lists every key with its default and one-line help.
"""

from .coerce import YAML_BOOL_WORDS
from .load import MAX_YAML_BYTES, MAX_YAML_VALUES, StrictLoader, describe_fields, load_config, read_yaml
from .legacy import LEGACY_KEYS, ConfigWarning
from .schema import (FOLDER_NAME_RULE, MAX_SEED, MEDNIST_CLASSES, MEDNIST_MD5, MEDNIST_URL,
                     CheckpointConfig, Config, DataConfig, EvalConfig, ExportConfig, LogConfig,
                     ModelConfig, OptimConfig, RuntimeConfig, TrainConfig, check_class_name, config_from_record,
                     plain_folder_name)

__all__ = [
    "YAML_BOOL_WORDS", "MAX_YAML_BYTES", "MAX_YAML_VALUES", "StrictLoader", "describe_fields", "load_config",
    "read_yaml", "FOLDER_NAME_RULE", "LEGACY_KEYS", "MAX_SEED", "MEDNIST_CLASSES", "MEDNIST_MD5", "MEDNIST_URL",
    "CheckpointConfig", "Config", "ConfigWarning", "DataConfig", "EvalConfig", "ExportConfig", "LogConfig",
    "ModelConfig", "OptimConfig", "RuntimeConfig", "TrainConfig", "check_class_name", "config_from_record",
    "plain_folder_name",
]
