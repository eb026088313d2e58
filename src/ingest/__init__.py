"""Getting HAM10000 in: sources, HTTP downloads, archives, the raw layout, synthetic data."""
