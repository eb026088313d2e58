"""Models logged to MLflow, loaded back by URI (`models:/<name>@champion`, `runs:/...`)."""

from __future__ import annotations

from pathlib import Path

import torch

from src.errors import UserError


def load_from_mlflow(model_uri: str, tracking_uri: str, explainable: bool = False) -> tuple[torch.nn.Module, int]:
    """The registered/logged model (the torch module it serves; eager, for attention maps, when `explainable`) and
    its input size."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from src.tracking.serving import load_explainable, load_served

    store = Path(tracking_uri.removeprefix("sqlite:///"))
    if tracking_uri.startswith("sqlite:///") and not store.exists():  # MLflow would create an empty store here
        raise UserError(
            f"no MLflow store at {store}: nothing has been registered yet; run `dvc repro` first, set "
            "MLFLOW_TRACKING_URI, or pass --checkpoint models/best.pt"
        )
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return load_explainable(model_uri) if explainable else load_served(model_uri)
    except (MlflowException, OSError) as err:
        raise UserError(
            f"cannot load model {model_uri} from {tracking_uri}: {err}; run `dvc repro` to train and register "
            "one (models trained on synthetic data are registered as <name>-synthetic), or pass --checkpoint "
            "models/best.pt"
        ) from None


def describe_model(model_uri: str, tracking_uri: str) -> str:
    """A registry model in words (name, version, alias, run, headline test score); other URIs as they are."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, _, alias = model_uri.removeprefix("models:/").partition("@")
    if not model_uri.startswith("models:/") or not alias:
        return model_uri
    try:
        version = MlflowClient(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return model_uri
    score = version.tags.get("test/balanced_accuracy")
    scored = f", test balanced accuracy {score}" if score else ""
    return f"{name} version {version.version} ({alias}), run {version.run_id[:8]}{scored}"
