"""The search's optional last step: the selected trial trained at a few sizes (``select.scale_family``).

Each family member is the best trial's spec (``spec.json``) scaled by one entry of
``select.scale_family`` (``width=2``, ``{depth: 1.5, img_size: 32}``, ...; see
:mod:`mixersnn.models.scale`) and trained with the trial's own training config and the
search's ``scale:`` resources through Ray Train. Its run is not a child of the search's parent
run (it is not a trial: the front and the sampler never see it); it is linked by tags:
``mixersnn.family_of`` (the parent run), ``mixersnn.source_run`` (the trial) and
``mixersnn.scale``. Runs are named ``<search>-family-<scale>``, so a resumed search continues a
member from its last checkpoint instead of training it again.
"""

from __future__ import annotations

import re
from typing import Any, Callable

__all__ = ["parse_member", "train_family"]


def parse_member(entry: Any, where: str) -> Any:
    """One ``scale_family`` entry (a ``"width=2,depth=1.5"`` string or a mapping) as a
    :class:`~mixersnn.models.scale.ModelScale`; raises ConfigError naming the entry."""
    from mixersnn.models.scale import parse_scale, scale_from_mapping

    if isinstance(entry, dict):
        return scale_from_mapping(entry, where=where)
    return parse_scale(str(entry), where=where)


def train_family(cfg: Any, uri: str, parent_run_id: str, best: Any, *, log: Callable[[str], None] = print
                 ) -> list[dict[str, Any]]:
    """Train ``best`` (a :class:`~search.tracking.TrialRow`) at each scale of
    ``cfg.select.scale_family``; returns one row per member (scale, run, size, result). A scale
    that breaks the architecture's constraints is logged and skipped; the others still train."""
    from mixersnn.models.config import ConfigError
    from mixersnn.models.scale import scale_config
    from search.resources import scale_config as resources
    from trainers.config import TrainConfig
    from trainers.ray_train import fit
    from trainers.spec import SCALE_TAG, SOURCE_RUN_TAG, RunSpec, log_run_spec, read_run_spec
    from trainers.tracking import MLflowTracker, start_run

    spec = read_run_spec(uri, best.run_id)
    rows: list[dict[str, Any]] = []
    log(f"\nscale family of trial-{best.trial_id} ({spec.describe()}):")
    for i, entry in enumerate(cfg.select.scale_family or ()):
        where = f"select.scale_family[{i}]"
        ms = parse_member(entry, where)
        try:
            mc = scale_config(spec.model_config, ms, where=where)
        except ConfigError as err:
            log(f"  skipped: {err}")
            continue
        label = str(ms) or "identity"
        name = f"{cfg.name}-family-{re.sub(r'[^A-Za-z0-9_.=-]+', '_', label)}"
        origin = {"run_id": best.run_id, "scale": ms.to_dict()}
        over = {k: v for k, v in mc.to_dict().items() if k not in ("in_chans", "num_classes")}
        tcfg = TrainConfig.from_dict({**spec.train, "model": spec.model, "model_overrides": over, "tracking_uri": uri,
                                      "experiment": cfg.experiment, "run_name": name})
        tags = {"mixersnn.kind": "train", "mixersnn.model": spec.model, "mixersnn.family_of": parent_run_id,
                SOURCE_RUN_TAG: best.run_id, SCALE_TAG: label}
        run_id = start_run(uri, cfg.experiment, name, tags=tags)
        log_run_spec(MLflowTracker(uri, run_id), RunSpec.of(tcfg, kind="train", num_workers=spec.num_workers,
                                                             source=origin), tags=tags)
        log(f"  {label}: C={mc.embed_dim} depths={list(mc.depths)} img={mc.img_size}, "
            f"{mc.closed_form_num_params():,} params: training as {name}")
        res = fit(tcfg, resources(cfg.scale, storage_path=str(cfg.search_dir() / "family"), name=name), name=name)
        m = res.metrics
        rows.append({"scale": label, "run_id": res.mlflow_run_id or run_id, "embed_dim": mc.embed_dim,
                     "depths": list(mc.depths), "img_size": mc.img_size, "num_params": mc.closed_form_num_params(),
                     "test_acc": m.get("test_acc"), "energy_per_image_uj": m.get("energy_per_image_uj")})
        log(f"    acc {m.get('test_acc', float('nan')):.4f}, {m.get('energy_per_image_uj', float('nan')):.3f} uJ/image")
    if rows:
        MLflowTracker(uri, parent_run_id).log_dict(rows, "search/scale_family.json")
    return rows
