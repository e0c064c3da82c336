"""vitdsi: a Vision Transformer as a Differentiable Search Index for image retrieval, and its baselines."""

__version__ = "0.1.0"
