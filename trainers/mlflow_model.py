"""Trained models as MLflow 3 logged models, and loading a model by ``runs:/`` or ``models:/`` URI.

A registered Mixer-SNN (``mixersnn train --register NAME``, a search's best trial) is an
``mlflow.pytorch`` logged model that a user can load and serve:

- a **signature** (input ``[-1, C, H, W]`` float32 normalised images; output per-step logits
  ``[T, -1, K]``: the class is the argmax of the mean over T) and an **input example**;
- **metadata** (in the MLmodel file): the run's spec (architecture and training config), the
  energy report (measured per image where the run measured it, and the dense bound), the MFI
  check's verdict, test accuracy, and how to read the output;
- **extra files**: the plain checkpoint ``model.pt`` (config + state dict: what ``mixersnn
  energy``, ``export`` and ``train --from-model`` load, with ``torch.load(weights_only=True)``,
  never by unpickling code), ``spec.json``, ``energy.json`` and ``mfi_report.json``;
- **requirements that install**: mixersnn is not on PyPI, so the model carries the
  ``mixersnn`` package itself as ``code_paths`` (the pickled module's classes resolve from
  it) and lists only the third-party packages that code imports, with loose ranges:
  ``torch>=2.2,<3``, ``numpy``, ``tqdm`` and ``safetensors`` (see :data:`PIP_REQUIREMENTS`). A
  requirement ``mixersnn`` would make ``mlflow models serve`` and ``pip install -r
  requirements.txt`` fail (or install an unrelated package of that name).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from mixersnn.errors import UserError

__all__ = ["PIP_REQUIREMENTS", "MODEL_NAME", "log_registered_model", "model_checkpoint", "load_model_uri"]

#: The third-party packages the ``mixersnn`` model code imports (pyproject's ranges; torch
#: capped at the next major). Not ``mixersnn``: it travels as code_paths.
PIP_REQUIREMENTS = ["torch>=2.2,<3", "numpy>=1.24", "tqdm>=4.60", "safetensors>=0.4"]
#: The logged model's name (MLflow 3 ``name=``).
MODEL_NAME = "registered_model"
_CHECKPOINT = "model.pt"


def _input_example(cfg: Any) -> Any:
    """One normalised-looking image ``[1, C, H, W]`` (seeded noise: real images are not at
    hand where a model is registered, and the example only shows the shape and scale)."""
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randn(1, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g).numpy()


def _signature(cfg: Any) -> Any:
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, cfg.in_chans, cfg.img_size, cfg.img_size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (cfg.T, -1, cfg.num_classes))]),
    )


def log_registered_model(uri: str, run_id: str, model_name: str, *, tags: Optional[dict[str, str]] = None,
                         tmp: Optional[str] = None) -> str:
    """Log the run's final checkpoint (``model/model.pt``) as an MLflow logged model and
    register it as ``model_name``.

    Args:
        uri: tracking (and registry) URI.
        run_id: a training run or trial that logged its final model.
        model_name: registry name.
        tags: extra model-version tags.
        tmp: folder for temporary files.

    Returns:
        The registered version (a string, e.g. "1").

    Raises:
        UserError: the run logged no final model.
    """
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file otherwise
    from mixersnn.models import load_checkpoint, load_model
    from trainers.spec import SPEC_FILE, SPEC_TAG
    from trainers.tracking import mlflow_client

    client = mlflow_client(uri)
    run = client.get_run(run_id)
    metrics = run.data.metrics
    with tempfile.TemporaryDirectory(dir=tmp) as d:
        local = _download_final_checkpoint(client, run_id, d)
        load_checkpoint(local)  # refuses anything but a mixersnn checkpoint (weights_only)
        model = load_model(local).eval()
        mfi = _download_mfi_report(client, run_id, d)
        spec = json.loads(run.data.tags[SPEC_TAG]) if SPEC_TAG in run.data.tags else None
        energy = _energy_record(model.config, metrics)
        files = _write_extra_files(d, {_CHECKPOINT: local, "energy.json": energy, SPEC_FILE: spec,
                                       "mfi_report.json": mfi})
        metadata = _metadata(model, run_id, spec=spec, energy=energy, mfi=mfi, metrics=metrics)
        _log_model(uri, run, model, model_name, files=files, metadata=metadata)
    return _tag_registered_version(uri, model_name, run_id, metrics=metrics, mfi=mfi, tags=tags)


def _download_final_checkpoint(client: Any, run_id: str, d: str) -> Path:
    """The run's final checkpoint ``model/model.pt``, downloaded into ``d``.

    Raises:
        UserError: the run has none (it did not finish training, or ran with log_model off).
    """
    try:
        return Path(client.download_artifacts(run_id, f"model/{_CHECKPOINT}", d))
    except Exception:
        raise UserError(f"run {run_id!r} has no final model (model/{_CHECKPOINT}) to register: it did not finish "
                        f"training, or ran with log_model off") from None


def _download_mfi_report(client: Any, run_id: str, d: str) -> Optional[dict[str, Any]]:
    """The run's MFI check (``model/mfi_report.json``), or None when it logged none."""
    try:
        return json.loads(Path(client.download_artifacts(run_id, "model/mfi_report.json", d)).read_text())
    except Exception:
        return None


def _energy_record(cfg: Any, metrics: dict[str, float]) -> dict[str, Any]:
    """The dense energy bound of ``cfg`` and the energy the run measured, where it did."""
    from mixersnn.accounting import energy_report

    dense = energy_report(cfg)
    return {
        "dense_bound_uj_per_image": dense.energy_pj * 1e-6,
        "dense_bound_note": "every spike-layer input firing (45 nm: 4.6 pJ/MAC, 0.9 pJ/AC)",
        **{k: metrics[k] for k in ("energy_per_image_uj", "sops_per_image", "macs_per_image", "mean_firing_rate")
           if k in metrics},
    }


def _write_extra_files(d: str, extra: dict[str, Any]) -> list[str]:
    """The logged model's extra files: paths as they are, records written as JSON into ``d``;
    None entries are left out."""
    files = []
    for fname, obj in extra.items():
        if obj is None:
            continue
        p = obj if isinstance(obj, Path) else Path(d) / fname
        if not isinstance(obj, Path):
            p.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
        files.append(str(p))
    return files


def _metadata(model: Any, run_id: str, *, spec: Optional[dict[str, Any]], energy: dict[str, Any],
              mfi: Optional[dict[str, Any]], metrics: dict[str, float]) -> dict[str, Any]:
    """The logged model's metadata (in its MLmodel file): where it came from and what it is."""
    return {
        "mixersnn_format": "mixersnn-logged-model/1",
        "source_run_id": run_id,
        "model_config": model.config.to_dict(),
        "spec": spec,
        "energy": energy,
        "mfi_ok": None if mfi is None else bool(mfi.get("ok")),
        "test_acc": metrics.get("test_acc"),
        "num_params": sum(p.numel() for p in model.parameters()),
        "output": "per-step logits [T, B, K]; the class is argmax over K of the mean over T",
        "checkpoint": f"extra_files/{_CHECKPOINT} (load with mixersnn.models.load_model)",
    }


@contextlib.contextmanager
def _fluent_uris(uri: str) -> Iterator[None]:
    """mlflow's fluent API (``log_model`` has no client form) pointed at ``uri`` for the block
    only: the process-wide tracking and registry URIs, and the environment variables mlflow
    sets from them for subprocesses, are put back afterwards, so registering a model does not
    redirect the caller's later MLflow calls or the Ray workers it starts."""
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # type: ignore[arg-type]  # None: unset
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])  # type: ignore[arg-type]
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _log_model(uri: str, run: Any, model: Any, model_name: str, *, files: list[str],
               metadata: dict[str, Any]) -> None:
    """``mlflow.pytorch.log_model`` into ``run``, registered as ``model_name``; the run's status
    is restored afterwards (logging into it re-opens it)."""
    import mlflow

    import mixersnn
    from trainers.tracking import mlflow_client

    cfg = model.config
    status = run.info.status
    with _fluent_uris(uri), mlflow.start_run(run_id=run.info.run_id):
        mlflow.pytorch.log_model(
            model, name=MODEL_NAME, registered_model_name=model_name, signature=_signature(cfg),
            input_example=_input_example(cfg), pip_requirements=list(PIP_REQUIREMENTS),
            code_paths=[str(Path(mixersnn.__file__).parent)], extra_files=files, metadata=metadata,
            serialization_format="pickle",
        )
    mlflow_client(uri).set_terminated(run.info.run_id, status)  # start_run(run_id) re-opened it


def _tag_registered_version(uri: str, model_name: str, run_id: str, *, metrics: dict[str, float],
                            mfi: Optional[dict[str, Any]], tags: Optional[dict[str, str]]) -> str:
    """Tag the version ``run_id`` registered (source run, accuracy, energy, MFI verdict, ``tags``);
    its number."""
    # The registry at this URI, named: a client without registry_uri takes the process-wide one,
    # which an earlier registration in this process may have pointed at another store.
    from mlflow.tracking import MlflowClient

    registry = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = registry.search_model_versions(f"name='{model_name}'")
    mine = [v for v in versions if v.run_id == run_id]
    version = str(max(mine or versions, key=lambda v: int(v.version)).version)
    vtags = {"mixersnn.source_run": run_id, **(tags or {})}
    if "test_acc" in metrics:
        vtags["mixersnn.test_acc"] = f"{metrics['test_acc']:.4f}"
    if "energy_per_image_uj" in metrics:
        vtags["mixersnn.energy_per_image_uj"] = f"{metrics['energy_per_image_uj']:.4f}"
    if mfi is not None:
        vtags["mixersnn.mfi_ok"] = str(bool(mfi.get("ok")))
    for k, v in vtags.items():
        registry.set_model_version_tag(model_name, version, k, v)
    return version


@contextlib.contextmanager
def model_checkpoint(model_uri: str, tracking_uri: Optional[str] = None) -> Iterator[Path]:
    """A local copy of the mixersnn checkpoint a ``runs:/`` or ``models:/`` URI names (deleted
    when the block ends).

    - ``runs:/RUN_ID``: the run's final model, ``model/model.pt``;
    - ``runs:/RUN_ID/PATH``: that artefact: a checkpoint file, or a logged model's folder;
    - ``models:/NAME/VERSION`` (``latest``, ``@ALIAS``): the registered model's checkpoint.

    Raises:
        UserError: the run, name, version or artefact does not exist, or holds no checkpoint.
    """
    import os

    from trainers.spec import _get_run, check_store, parse_model_uri, resolve_model_version
    from trainers.tracking import mlflow_client, resolve_tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = resolve_tracking_uri(tracking_uri)
    scheme, ident, rest = parse_model_uri(model_uri)
    with tempfile.TemporaryDirectory() as d:
        if scheme == "runs":
            check_store(uri, f"run {ident!r}")
            _get_run(mlflow_client(uri), uri, ident)
            artifact = f"runs:/{ident}/{rest or 'model/' + _CHECKPOINT}"
        else:
            mv = resolve_model_version(uri, ident, rest)
            # The version's source (MLflow 3: models:/<logged model id>) resolves through the
            # tracking URI; models:/NAME/VERSION would go through the process-wide registry URI.
            artifact = mv.source or f"models:/{ident}/{mv.version}"
        try:
            local = _download(artifact, d, uri)
        except Exception as err:
            raise UserError(f"{model_uri}: cannot download {artifact} from {uri} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200] if str(err) else ''}); check the artefact path "
                            f"(runs:/RUN_ID alone means the run's final model)") from None
        if local.is_dir():
            found = [p for p in (local / "extra_files" / _CHECKPOINT, local / _CHECKPOINT) if p.is_file()]
            if not found and scheme == "models" and mv.run_id:
                # Registered before the checkpoint travelled with the model: its run's final model.
                try:
                    found = [_download(f"runs:/{mv.run_id}/model/{_CHECKPOINT}", d, uri)]
                except Exception:
                    found = []
            if not found:
                raise UserError(f"{model_uri} holds no mixersnn checkpoint ({_CHECKPOINT}); point at one "
                                f"(runs:/RUN_ID/model/{_CHECKPOINT}) or a model registered by mixersnn")
            local = found[0]
        yield local


def _download(artifact: str, dst: str, uri: str) -> Path:
    """``mlflow.artifacts.download_artifacts`` from the store at ``uri``. A logged model's URI
    (``models:/<model id>``) is looked up through the process-wide tracking URI whatever
    ``tracking_uri`` says, so that is pointed at ``uri`` for the call only."""
    import mlflow.artifacts

    with _fluent_uris(uri):
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact, dst_path=dst, tracking_uri=uri))


def load_model_uri(model_uri: str, tracking_uri: Optional[str] = None, **neuron_overrides: Any) -> Any:
    """The ``MixerSNN`` a ``runs:/`` or ``models:/`` URI names (weights loaded with
    ``weights_only=True``)."""
    from mixersnn.models import load_model

    with model_checkpoint(model_uri, tracking_uri) as path:
        try:
            return load_model(path, **neuron_overrides)
        except ValueError:
            raise UserError(f"{model_uri} is not a mixersnn checkpoint (torch.load(weights_only=True) refused it, or "
                            f"it lacks the checkpoint format); point at a run's final model (runs:/RUN_ID or "
                            f"runs:/RUN_ID/model/{_CHECKPOINT}) or a model registered by mixersnn") from None
