"""leo-suite: LEO and friends, TF2 + Sonnet 2, on pre-computed embeddings."""

__version__ = "0.1.0"
