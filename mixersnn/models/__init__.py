"""Mixer-SNN models: config, network and registry."""

from __future__ import annotations

from mixersnn.models.checkpoint import load_checkpoint, load_model, save_checkpoint
from mixersnn.models.config import ConfigError, MixerSNNConfig, NeuronConfig
from mixersnn.models.mixer_snn import MixerBlock, MixerSNN, Stage
from mixersnn.models.registry import create_model, list_models, model_config, register_model

__all__ = [
    "ConfigError",
    "MixerBlock",
    "MixerSNN",
    "MixerSNNConfig",
    "NeuronConfig",
    "Stage",
    "create_model",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "list_models",
    "model_config",
    "register_model",
]
