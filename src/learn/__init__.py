"""The learning core (pure torch/numpy): dataset and transforms, model, training loop, checkpoints, metrics."""
