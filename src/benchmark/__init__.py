"""Speed benchmark: the device ceiling, model-only and real training throughput, a naive baseline, inference."""
