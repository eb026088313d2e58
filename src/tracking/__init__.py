"""The one place that talks to MLflow: runs, registry, plots."""
