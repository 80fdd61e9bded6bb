"""sdjax fine-tuning: `python -m train` (see train/__main__.py and the README)."""
