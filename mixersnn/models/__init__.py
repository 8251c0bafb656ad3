"""Mixer-SNN models: config, network and registry."""

from __future__ import annotations

from mixersnn.models.checkpoint import load_checkpoint, load_model, load_supernet, save_checkpoint
from mixersnn.models.config import ConfigError, MixerSNNConfig, NeuronConfig
from mixersnn.models.mixer_snn import MixerBlock, MixerSNN, Stage
from mixersnn.models.registry import create_model, list_models, model_config, register_model
from mixersnn.models.supernet import MixerSNNSupernet, SubnetSpec, SupernetSpace

__all__ = [
    "ConfigError",
    "MixerBlock",
    "MixerSNN",
    "MixerSNNConfig",
    "MixerSNNSupernet",
    "NeuronConfig",
    "Stage",
    "SubnetSpec",
    "SupernetSpace",
    "create_model",
    "load_checkpoint",
    "load_model",
    "load_supernet",
    "save_checkpoint",
    "list_models",
    "model_config",
    "register_model",
]
