"""Hyperparameter search with Optuna: search space, study storage and workers, one trial."""
