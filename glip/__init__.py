"""GLIP Explorer: a pure-PyTorch GLIP (Grounded Language-Image Pre-training, Li et al., CVPR 2022)."""
from .config import PRESETS, GLIPConfig, get_preset
from .model import GLIP, GLIPOutput

__all__ = ["GLIP", "GLIPConfig", "GLIPOutput", "PRESETS", "get_preset"]
__version__ = "0.1.0"
