"""GLIP Explorer: a pure-PyTorch GLIP (Grounded Language-Image Pre-training, Li et al., CVPR 2022).

    from glip import GLIP
    model = GLIP.from_pretrained("toy-student")
    result = model.predict("photo.jpg", "red circle . blue square")   # → GroundingResult
    draw_result(result, "photo.jpg").save("out.png")

Everything a user receives or needs is importable from here; errors a user can cause derive from
`GLIPError` (catch that, not ValueError).
"""
from .config import PRESETS, GLIPConfig, get_preset
from .draw import draw_result
from .errors import CheckpointError, ConfigError, DataError, GLIPError, ImageError, PromptError
from .image import LoadedImage, load_image, open_image, probe_size
from .model import GLIP, GLIPOutput
from .prompts import Prompt, from_caption, from_categories, parse_prompt
from .results import GroundingResult

__all__ = [
    "GLIP", "GLIPConfig", "GLIPOutput", "GroundingResult", "PRESETS", "get_preset",
    "Prompt", "parse_prompt", "from_categories", "from_caption",
    "GLIPError", "ImageError", "PromptError", "CheckpointError", "DataError", "ConfigError",
    "draw_result", "LoadedImage", "load_image", "open_image", "probe_size",
]
__version__ = "0.1.0"
