"""fastslow: a reproducible study of fast (dual encoder) and slow (cross-attention) retrieval."""

__version__ = "0.1.0"
