"""The model behind the demo page, loaded when first needed and retried while there is none, so a page started
before the first `dvc repro` works once a model is registered, without a restart."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    module: torch.nn.Module  # eager Probabilities: calibrated probabilities, and layers for attention maps
    size: int
    description: str  # which model this is, in words: name, version, run, test score


class ModelSource:
    """Loads `model_uri` from the tracking store on first use; a failure is remembered as a message and retried on
    the next request."""

    def __init__(self, model_uri: str, tracking_uri: str):
        self.model_uri = model_uri
        self.tracking_uri = tracking_uri
        self._loaded: LoadedModel | None = None
        self._lock = threading.Lock()  # one load at a time; requests also share the model through it

    def get(self) -> LoadedModel:
        """The model, or a UserError that says why there is none and what to do."""
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load()
            return self._loaded

    def _load(self) -> LoadedModel:
        from src.tracking.models import describe_model, load_from_mlflow

        module, size = load_from_mlflow(self.model_uri, self.tracking_uri, explainable=True)
        description = describe_model(self.model_uri, self.tracking_uri)
        log.info("demo page serves %s", description)
        return LoadedModel(module.eval(), size, description)

    def run(self, work):
        """Call work(model) with the model held, so concurrent requests take turns on the CPU."""
        model = self.get()
        with self._lock:
            return work(model)
