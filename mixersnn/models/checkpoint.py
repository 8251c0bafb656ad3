"""Model checkpoints: a plain dict of tensors and JSON-able config, loaded with weights_only.

Layout (``torch.save`` of a dict): ``{"format": "mixersnn-checkpoint/1", "config": {...},
"model_name": str | None, "model": state_dict, ...extra}``. Trainer checkpoints add
optimiser/scheduler/scaler state and the epoch under their own keys; every reader here
ignores what it does not need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch

from mixersnn._atomic import atomic_path
from mixersnn.models.config import MixerSNNConfig
from mixersnn.models.mixer_snn import MixerSNN

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "load_model", "load_supernet", "atomic_torch_save"]

CHECKPOINT_FORMAT = "mixersnn-checkpoint/1"


def atomic_torch_save(obj: Any, path: Union[str, Path]) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a crash never leaves
    a half-written file where a good one was."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(
    path: Union[str, Path], model: MixerSNN, *, model_name: Optional[str] = None, **extra: Any
) -> None:
    """Write ``model`` (config + state dict) and any ``extra`` picklable-safe entries."""
    obj = {
        "format": CHECKPOINT_FORMAT,
        "config": model.config.to_dict(),
        "model_name": model_name,
        "model": model.state_dict(),
    }
    obj.update(extra)
    atomic_torch_save(obj, path)


def load_checkpoint(path: Union[str, Path], *, map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # not a torch file, or one that needs unsafe unpickling
        raise ValueError(
            f"{path} is not a mixersnn checkpoint: torch.load(weights_only=True) refused it "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Write "
            f"checkpoints with mixersnn.models.save_checkpoint"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT or "config" not in obj:
        raise ValueError(
            f"{path} is not a mixersnn checkpoint (expected a dict with format "
            f"{CHECKPOINT_FORMAT!r}); write it with mixersnn.models.save_checkpoint"
        )
    return obj


def load_model(path: Union[str, Path], *, map_location: Union[str, torch.device] = "cpu", **neuron_overrides: Any) -> MixerSNN:
    """Rebuild the model of a checkpoint and load its weights (strictly).

    Args:
        path: checkpoint file.
        map_location: device for the tensors.
        **neuron_overrides: e.g. ``backend="torch"``, applied to the stored config.
    """
    obj = load_checkpoint(path, map_location=map_location)
    if obj.get("supernet"):
        raise ValueError(
            f"{path} holds a supernet (a one-shot search's shared weights), not one model; load it "
            f"with mixersnn.models.load_supernet and take a subnet with .extract(spec)"
        )
    cfg = MixerSNNConfig.from_dict(obj["config"]).replace(**neuron_overrides)
    model = MixerSNN(cfg)
    model.load_state_dict(obj["model"])
    return model


def load_supernet(path: Union[str, Path], *, map_location: Union[str, torch.device] = "cpu",
                  **neuron_overrides: Any) -> Any:  # fmt: skip
    """Rebuild the :class:`~mixersnn.models.supernet.MixerSNNSupernet` of a supernet training
    run's checkpoint (``train.supernet`` set) and load its weights (strictly)."""
    from mixersnn.models.supernet import MixerSNNSupernet, SupernetSpace

    obj = load_checkpoint(path, map_location=map_location)
    if not obj.get("supernet"):
        raise ValueError(f"{path} holds one model, not a supernet; load it with mixersnn.models.load_model")
    base = MixerSNNConfig.from_dict(obj["config"]).replace(**neuron_overrides)
    supernet = MixerSNNSupernet(base, SupernetSpace.from_dict(obj["supernet"]))
    supernet.load_state_dict(obj["model"])
    return supernet
