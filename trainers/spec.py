"""The typed spec of a training run: what it trains, recorded on its MLflow run, read back whole.

Every training run (``mixersnn train`` and every search trial) logs one :class:`RunSpec` as
``spec.json`` (and, while it fits, the same JSON in the ``mixersnn.spec`` tag, readable without
artefact access). ``mixersnn train --from-run RUN_ID`` / ``--from-model URI`` rebuild the
training config from it, never from the run's individual params, which are a flattened,
stringified view for the UI.

Which run a source names, and the one-line refusals when it cannot be used (no such run on
this tracking server, not a training run, no spec, a spec that no longer validates, a
``models:/`` name or version that does not exist), are here too; all raise
:class:`~mixersnn.errors.UserError` before Ray starts.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mixersnn.errors import UserError
from mixersnn.models.config import ConfigError, MixerSNNConfig

__all__ = ["RunSpec", "SPEC_FORMAT", "SPEC_FILE", "SPEC_TAG", "SOURCE_RUN_TAG", "SOURCE_MODEL_TAG", "SCALE_TAG",
           "TRAINING_KINDS", "log_run_spec", "read_run_spec", "resolve_source", "Source", "parse_model_uri",
           "resolve_model_version", "is_model_uri", "check_store"]

SPEC_FORMAT = "mixersnn-run-spec/1"
SPEC_FILE = "spec.json"
SPEC_TAG = "mixersnn.spec"
SOURCE_RUN_TAG = "mixersnn.source_run"
SOURCE_MODEL_TAG = "mixersnn.source_model"
SCALE_TAG = "mixersnn.scale"
KIND_TAG = "mixersnn.kind"
#: ``mixersnn.kind`` of the runs that train a model (a search's parent run is ``search``).
TRAINING_KINDS = ("train", "trial", "baseline")
_TAG_LIMIT = 8000  # MLflow's longest tag value
#: TrainConfig fields that name or file a run, not what it trains (and the model, held apart).
_NOT_TRAINING = ("model", "model_overrides", "tracking_uri", "experiment", "run_name", "parent_run_id", "log_model")
#: Model fields the data fills (a retrain on other data takes that data's channels and classes).
_DATA_FILLED = ("in_chans", "num_classes")


@dataclass(frozen=True)
class RunSpec:
    """What one training run trains.

    Attributes:
        model: the registry variant it started from.
        model_config: the architecture as built (data shape filled in, overrides applied).
        train: the TrainConfig fields that change what trains (optimiser, schedule, data,
            budgets, ...), without the bookkeeping ones (tracking URI, experiment, run name).
        num_workers: data-parallel workers (with ``batch_size`` per worker: the global batch).
        kind: ``train`` (``mixersnn train``), ``trial`` or ``baseline`` (a search's).
        source: where it came from when retrained or scaled: ``run_id``, ``model_uri``,
            ``scale``, ``config_model_overrides`` (the architecture fields a ``--config``
            file changed, each ``{"from", "to"}``); each only when set.
    """

    model: str
    model_config: MixerSNNConfig
    train: dict[str, Any]
    num_workers: int = 1
    kind: str = "train"
    source: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: Any, *, kind: str, num_workers: int = 1, source: Optional[dict[str, Any]] = None) -> "RunSpec":
        """The spec of a :class:`~trainers.config.TrainConfig`: the model is resolved as the
        training loop resolves it (the data's shape, then the config's overrides)."""
        from mixersnn.models import model_config
        from trainers.loop import resolve_data

        data = resolve_data(cfg.data)
        mc = model_config(cfg.model, **{"img_size": data.img_size, "in_chans": data.in_chans,
                                        "num_classes": data.num_classes, **cfg.model_overrides})
        train = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_TRAINING}
        from mixersnn.data import remote

        if train["data"] != "fashion-mnist" and not remote.is_remote(train["data"]):
            train["data"] = str(Path(train["data"]).resolve())  # a retrain may start from another folder
        return cls(model=cfg.model, model_config=mc, train=train, num_workers=int(num_workers), kind=kind,
                   source=dict(source or {}))

    def arch_overrides(self) -> dict[str, Any]:
        """The architecture as model overrides: every field but the ones the data fills."""
        # stage_dims only when set, so specs of doubling-width models give the overrides (and the
        # run names hashed from them) they always did.
        return {k: v for k, v in self.model_config.to_dict().items()
                if k not in _DATA_FILLED and not (k == "stage_dims" and v is None)}

    def train_dict(self) -> dict[str, Any]:
        """The TrainConfig fields to start a retrain from (flags and YAML go on top)."""
        return {**self.train, "model": self.model, "model_overrides": self.arch_overrides()}

    def describe(self) -> str:
        c = self.model_config
        width = f"C={c.embed_dim}" if c.stage_dims is None else f"widths={list(c.stage_dims)}"
        return (f"{self.model} {width} depths={list(c.depths)} T={c.T} p={c.patch_size} r={c.mlp_ratio:g} "
                f"spe={c.spe} img={c.img_size}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": SPEC_FORMAT, "kind": self.kind, "model": self.model,
                "model_config": self.model_config.to_dict(), "train": dict(self.train),
                "num_workers": self.num_workers, "source": dict(self.source)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=str)

    @classmethod
    def from_dict(cls, d: Any) -> "RunSpec":
        """Rebuild and validate (the architecture and the training config it gives).

        Raises:
            ConfigError: another format, a missing field, or values that no longer validate.
        """
        if not isinstance(d, dict) or d.get("format") != SPEC_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ConfigError(f"spec format {got!r} is not {SPEC_FORMAT!r} (made by another mixersnn version)")
        missing = sorted({"model", "model_config", "train"} - set(d))
        if missing:
            raise ConfigError(f"spec lacks {missing}")
        spec = cls(model=str(d["model"]), model_config=MixerSNNConfig.from_dict(dict(d["model_config"])),
                   train=dict(d["train"]), num_workers=int(d.get("num_workers", 1)), kind=str(d.get("kind", "train")),
                   source=dict(d.get("source") or {}))
        from trainers.config import TrainConfig

        TrainConfig.from_dict(spec.train_dict())  # the training config it gives must validate too
        return spec


def log_run_spec(tracker: Any, spec: RunSpec, tags: Optional[dict[str, Any]] = None) -> None:
    """Record ``spec`` on the tracker's run: ``spec.json`` and the ``mixersnn.spec`` tag (when
    it fits in a tag), with ``tags`` (the source links) beside it. Safe to repeat (a resumed
    run writes the same spec again)."""
    text = spec.to_json()
    tracker.log_dict(spec.to_dict(), SPEC_FILE)
    all_tags = {KIND_TAG: spec.kind, **(tags or {})}
    if len(text) <= _TAG_LIMIT:
        all_tags[SPEC_TAG] = text
    tracker.set_tags(all_tags)


# ---------------------------------------------------------------------------- reading
def check_store(uri: str, what: str) -> None:
    """A local sqlite store that does not exist holds nothing: say so (MLflow would create an
    empty one and report the run or model missing)."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise UserError(f"{what}: there is no MLflow store at {uri[len('sqlite:///'):]}, so it was made on another "
                        f"server or store: pass that one with --tracking-uri (or $MLFLOW_TRACKING_URI), e.g. the "
                        f"URI the search or run printed")


def _no_run(uri: str, run_id: str) -> UserError:
    return UserError(f"run {run_id!r} does not exist on the tracking server {uri}: it was made on another server "
                     f"or store, or the id is mistyped. Pass that server with --tracking-uri (or "
                     f"$MLFLOW_TRACKING_URI), or a run id from `mixersnn report` / the MLflow UI of this one")


def _get_run(client: Any, uri: str, run_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    if not run_id or "/" in run_id or " " in run_id:
        raise _no_run(uri, run_id)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise _no_run(uri, run_id) from None
    if run.info.lifecycle_stage == "deleted":
        raise UserError(f"run {run_id!r} on {uri} is deleted: restore it (mlflow runs restore --run-id {run_id}) "
                        f"or use another run")
    return run


def _params_hint(run: Any) -> str:
    """For a run without a spec: the ``mixersnn train`` flags its logged params suggest."""
    p = run.data.params
    flags = []
    for key, flag in (("train.model", "--model"), ("model.embed_dim", "--embed-dim"), ("model.T", "--T"),
                      ("model.patch_size", "--patch-size"), ("model.mlp_ratio", "--mlp-ratio")):
        if key in p:
            flags.append(f"{flag} {p[key]}")
    if "model.depths" in p:
        try:
            flags.append("--depths " + ",".join(str(int(v)) for v in json.loads(p["model.depths"])))
        except (ValueError, TypeError):
            pass
    if p.get("model.spe") == "False":
        flags.append("--no-spe")
    return f" (its params suggest: mixersnn train {' '.join(flags)})" if flags else ""


def read_run_spec(uri: str, run_id: str) -> RunSpec:
    """The spec recorded on a training run.

    Raises:
        UserError: the run does not exist on ``uri`` (or is deleted), is not a training run
            or trial, has no spec (made before specs were recorded), or its spec cannot be
            rebuilt; each in one line with the fix.
    """
    from trainers.tracking import mlflow_client

    check_store(uri, f"run {run_id!r}")
    client = mlflow_client(uri)
    run = _get_run(client, uri, run_id)
    tags = run.data.tags
    kind = tags.get(KIND_TAG)
    if kind == "search":
        raise UserError(f"run {run_id!r} is a search's parent run, not a training run: pass the run id of one of "
                        f"its trials (`mixersnn report {run.info.run_name}` lists them) or its registered model "
                        f"(--from-model models:/NAME/VERSION)")
    raw = tags.get(SPEC_TAG)
    if raw is None:
        try:
            with tempfile.TemporaryDirectory() as d:
                raw = Path(client.download_artifacts(run_id, SPEC_FILE, d)).read_text()
        except Exception:
            raw = None
    if raw is None:
        if kind not in TRAINING_KINDS and "train.model" not in run.data.params:
            raise UserError(f"run {run_id!r} ({run.info.run_name}) on {uri} is not a mixersnn training run or "
                            f"search trial (tag {KIND_TAG}={kind!r}): pass the run id of a `mixersnn train` run "
                            f"or of a search trial")
        status = tags.get("mixersnn.trial_status")
        never = ("infeasible", "screened", "estimate")
        why = (f"it never trained ({status}: {tags.get('mixersnn.reason', '')})" if status in never
               else f"it has no {SPEC_FILE} (made before mixersnn recorded run specs, or it failed before training)")
        raise UserError(f"run {run_id!r} ({run.info.run_name}) cannot be retrained: {why}. Retrain it with "
                        f"explicit flags{_params_hint(run)}, or use a run made by this version")
    try:
        return RunSpec.from_dict(json.loads(raw))
    except (ValueError, TypeError, KeyError) as err:  # ConfigError is a ValueError
        raise UserError(f"the spec of run {run_id!r} ({run.info.run_name}) cannot be rebuilt: {err}. Retrain it "
                        f"with explicit flags{_params_hint(run)}") from None


# ---------------------------------------------------------------------------- model URIs
def is_model_uri(s: str) -> bool:
    return str(s).startswith(("runs:/", "models:/"))


def parse_model_uri(s: str) -> tuple[str, str, str]:
    """``runs:/RUN_ID[/path]`` -> ``("runs", RUN_ID, path)``; ``models:/NAME/VERSION``,
    ``models:/NAME/latest`` or ``models:/NAME@ALIAS`` -> ``("models", NAME, VERSION|latest|@ALIAS)``.

    Raises:
        UserError: anything else, with the accepted forms.
    """
    forms = "runs:/RUN_ID[/ARTIFACT_PATH], models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS"
    if s.startswith("runs:/"):
        rest = s[len("runs:/"):].strip("/")
        run_id, _, path = rest.partition("/")
        if not run_id:
            raise UserError(f"model URI {s!r} names no run; use {forms}")
        return "runs", run_id, path
    if s.startswith("models:/"):
        rest = s[len("models:/"):].strip("/")
        if "@" in rest and "/" not in rest:
            name, _, alias = rest.partition("@")
            if name and alias:
                return "models", name, "@" + alias
        name, _, version = rest.rpartition("/")
        if name and version and (version.isdigit() or version == "latest"):
            return "models", name, version
        raise UserError(f"model URI {s!r} is not of the form models:/NAME/VERSION (VERSION a number or 'latest') "
                        f"or models:/NAME@ALIAS")
    raise UserError(f"{s!r} is not a model URI; use {forms}")


def resolve_model_version(uri: str, name: str, version: str) -> Any:
    """The registered ``ModelVersion`` a ``models:/`` URI names.

    Raises:
        UserError: no registered model of that name on ``uri`` (the message lists some that
            exist), or no such version or alias (it lists the versions).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    check_store(uri, f"models:/{name}/{version.lstrip('@')}")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            names = [m.name for m in client.search_registered_models(max_results=10)]
        except MlflowException:
            names = []
        here = f"registered models there: {', '.join(names)}" if names else "it has no registered models"
        raise UserError(f"models:/{name}/{version.lstrip('@')}: no registered model {name!r} on the tracking server "
                        f"{uri} ({here}); check the name (a search registers <search name>-best; "
                        f"`mixersnn report NAME` shows it) or pass the right --tracking-uri") from None
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    listed = ", ".join(str(v.version) for v in versions) or "none"
    try:
        if version == "latest":
            if not versions:
                raise MlflowException("no versions")
            return versions[-1]
        if version.startswith("@"):
            return client.get_model_version_by_alias(name, version[1:])
        return client.get_model_version(name, version)
    except MlflowException:
        what = f"alias {version[1:]!r}" if version.startswith("@") else f"version {version}"
        latest = f"; use models:/{name}/{versions[-1].version} (the latest)" if versions else ""
        raise UserError(f"registered model {name!r} on {uri} has no {what} (versions: {listed}){latest}") from None


@dataclass(frozen=True)
class Source:
    """A retrain's source: the run, its spec, and the model URI it was named by (if any)."""

    run_id: str
    spec: RunSpec
    model_uri: Optional[str] = None


def resolve_source(uri: str, *, run_id: Optional[str] = None, model_uri: Optional[str] = None) -> Source:
    """The source of ``--from-run RUN_ID`` or ``--from-model URI`` (``runs:/`` or ``models:/``).

    Raises:
        UserError: see :func:`read_run_spec`, :func:`parse_model_uri` and
            :func:`resolve_model_version`.
    """
    if run_id is not None and model_uri is not None:
        raise UserError("give one source: --from-run RUN_ID or --from-model URI, not both")
    if model_uri is not None:
        scheme, ident, rest = parse_model_uri(model_uri)
        if scheme == "runs":
            return Source(ident, read_run_spec(uri, ident), model_uri)
        mv = resolve_model_version(uri, ident, rest)
        if not mv.run_id:
            raise UserError(f"{model_uri} (version {mv.version}) is not linked to a training run, so its spec cannot "
                            f"be read; register models with `mixersnn train --register` or a search")
        return Source(mv.run_id, read_run_spec(uri, mv.run_id), f"models:/{ident}/{mv.version}")
    if run_id is None:
        raise UserError("no source given: pass --from-run RUN_ID or --from-model URI")
    return Source(run_id, read_run_spec(uri, run_id))
