"""safeft: safety-preserving fine-tuning of aligned language models."""

__version__ = "0.1.0"
