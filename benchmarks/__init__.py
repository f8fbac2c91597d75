"""Benchmarks of jax_sprnn: ``python -m benchmarks.run --suite paper|sweep|capacity|training``."""
