"""Typed configuration: schema (dataclasses), YAML loading with overrides, validation."""

from mtpd_megatron.config.load import ConfigError, config_from_dict, config_to_dict, dump_config, load_config
from mtpd_megatron.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    MTPConfig,
    MTPDConfig,
    ParallelConfig,
    TrainingConfig,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "MoEConfig",
    "MTPConfig",
    "MTPDConfig",
    "ParallelConfig",
    "TrainingConfig",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
]
