"""The export stage: `python -m launch.export` (main.py) writes the encoder as a stock Hugging Face ModernBERT
folder; modelcard.py writes its README.md and loss plot."""
