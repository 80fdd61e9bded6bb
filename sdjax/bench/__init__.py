"""Benchmark sdjax against PyTorch diffusers: `python -m sdjax.bench --help`."""
