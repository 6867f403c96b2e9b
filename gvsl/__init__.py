"""gvsl: Geometric Visual Similarity Learning for 3D CT/MR.

This package root stays free of torch on purpose: ``gvsl.runtime`` is imported
through it by inference servers that have no PyTorch installed. Training code
lives in submodules (``gvsl.model``, ``gvsl.train`` ...) that import torch
themselves.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
