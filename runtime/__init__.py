"""gvsl.runtime: torch-free preprocessing and inference helpers.

Imported by inference servers that have only numpy, scipy and nibabel, so no
module in this package may import torch.
"""

from .errors import GvslInputError
from .preprocess import PreprocessConfig, Volume, load_volume, preprocess

__all__ = ["GvslInputError", "PreprocessConfig", "Volume", "load_volume", "preprocess"]
