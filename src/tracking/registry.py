"""The model registry: the name a model goes under, the few tags a version carries, and promotion judged on the
split images the new model was scored on.

A version becomes `champion` only when it beats the current champion on `evaluate.promote_metric` on the same
images (by default the served model's val balanced accuracy: models are chosen on val, never on test): when the
champion was scored on another split (another seed, other data), it is loaded from the registry and scored again on
today's. Models trained on generated data are registered under `<name>-synthetic`, so the champion that
`src.predict` uses by default is always a model trained on real images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from src.config import TrackingParams
from src.errors import UserError
from src.tracking.runs import TrackingError

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"
SYNTHETIC_SUFFIX = "-synthetic"
# What the versions table shows; every metric stays on the run.
HEADLINE = ("test/balanced_accuracy", "test/macro_roc_auc", "test/melanoma_sensitivity", "test/melanoma_specificity")
PROVENANCE = ("data.source", "data.split_hash", "git.commit")
# MLflow's SQL stores hold a version's description in a VARCHAR(5000): Postgres and MySQL refuse a longer one,
# SQLite does not check; behind a tracking server the database is unknown, so the limit holds there too.
MAX_DESCRIPTION = 5000
UNLIMITED_STORES = ("sqlite:", "file:")

Rescore = Callable[[str], float | None]  # model URI -> its promote metric on today's split (None: cannot)


@dataclass
class Comparison:
    version: str | None  # the champion's, None when there is none
    score: float | None  # its promote metric on today's split, None when it could not be measured
    how: str


def registered_name(tracking: TrackingParams, tags: dict[str, str]) -> str:
    """`tracking.registered_model`, or `<it>-synthetic` for a model trained on generated data."""
    synthetic = tags.get("data.synthetic") == "true"
    return tracking.registered_model + (SYNTHETIC_SUFFIX if synthetic else "")


def compare_with_champion(
    client: MlflowClient, name: str, metric: str, split_hash: str, rescore: Rescore
) -> Comparison:
    """The champion's score on the split the new version was scored on."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return Comparison(None, None, "no champion yet")
    if champion.tags.get("data.split_hash") == split_hash and metric in champion.tags:
        return Comparison(champion.version, _full_precision(client, champion, metric), "scored on this split")
    try:
        score = rescore(f"models:/{name}/{champion.version}")
    except (UserError, MlflowException, OSError) as err:  # the new version is still registered, not promoted
        log.warning("champion v%s could not be scored on this split: %s", champion.version, err)
        return Comparison(champion.version, None, f"could not be scored on this split ({type(err).__name__})")
    how = "rescored on this split" if score is not None else f"{metric} cannot be recomputed on this split"
    return Comparison(champion.version, score, how)


def _full_precision(client: MlflowClient, version, metric: str) -> float:
    """The champion's metric as its run logged it: the version tag is rounded for display, and comparing with a
    rounded score would let the same model, evaluated again, "beat" itself."""
    try:
        return float(client.get_run(version.run_id).data.metrics[metric])
    except (MlflowException, KeyError):
        return float(version.tags[metric])


def promotion(new: float, champion: Comparison, metric: str) -> tuple[bool, str]:
    """Whether the new version becomes champion, and why, in words for the version's tags."""
    if champion.version is None:
        return True, f"first model: {metric} {new:.4f}"
    if champion.score is None:
        return False, f"champion v{champion.version}: {champion.how}; not promoted (set the alias by hand)"
    verdict = "beats" if new > champion.score else "does not beat"
    return new > champion.score, (
        f"{metric} {new:.4f} {verdict} champion v{champion.version} {champion.score:.4f} ({champion.how})"
    )


def version_tags(run_id: str, metrics: dict[str, float], provenance: dict[str, str], metric: str) -> dict[str, str]:
    """A handful of tags: where the model came from and its headline test metrics."""
    shown = {k: f"{metrics[k]:.4g}" for k in (*HEADLINE, metric) if k in metrics}
    return {"run_id": run_id, **{k: provenance[k] for k in PROVENANCE if k in provenance}, **shown}


def register(
    model_uri: str,
    run_id: str,
    metrics: dict[str, float],
    provenance: dict[str, str],
    tracking: TrackingParams,
    metric: str,
    rescore: Rescore,
) -> dict[str, object]:
    """Register a version, tag it, make it `challenger`, and `champion` if it beats the champion on this split."""
    if metric not in metrics:
        raise TrackingError(
            f"evaluate.promote_metric: {metric!r} is not a computed metric; choose one of {sorted(metrics)}"
        )
    client, name = MlflowClient(), registered_name(tracking, provenance)
    champion = compare_with_champion(client, name, metric, provenance.get("data.split_hash", ""), rescore)
    promoted, why = promotion(metrics[metric], champion, metric)
    tags = version_tags(run_id, metrics, provenance, metric) | {"promotion": why}
    version = mlflow.register_model(model_uri, name, tags=tags).version
    client.set_registered_model_alias(name, CHALLENGER, version)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    log.info("registered %s version %s: %s", name, version, why)
    return {"name": name, "version": int(version), "promoted": promoted, "champion_score": champion.score}


def fit_description(text: str, where: str, limit: int | None = MAX_DESCRIPTION) -> str:
    """`text` (Markdown with `## ` sections) as it fits in a version's description: whole, or without its longest
    sections and a line saying `where` the full text is."""
    if limit is None or len(text) <= limit:
        return text
    head, *sections = text.split("\n## ")
    sections = [f"## {s}" for s in sections]
    dropped: list[str] = []
    note = ""
    while sections:
        longest = max(sections, key=len)
        sections.remove(longest)
        dropped.append(longest.splitlines()[0].removeprefix("## "))
        note = f"*Cut to fit the registry (left out: {'; '.join(dropped)}); the full text is {where}.*"
        shorter = "\n".join([head, *sections, note])
        if len(shorter) <= limit:
            return shorter
    return (head[: max(0, limit - len(note) - 1)] + "\n" + note)[:limit]


def describe(name: str, version: int | str, text: str, where: str) -> None:
    """Set a registered version's description (what the registry page shows), cut to fit where it must be."""
    uri = mlflow.get_registry_uri()
    limit = None if uri.startswith(UNLIMITED_STORES) or "://" not in uri else MAX_DESCRIPTION  # a bare path: files
    MlflowClient().update_model_version(name, str(version), description=fit_description(text, where, limit))
