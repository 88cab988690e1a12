"""protext: learn CLIP prompts from text alone (ProText) and carry them into test-time prompt tuning.

Pipeline: descriptions -> targets -> prompts -> training -> checkpoint -> zero-shot / TPT evaluation.
"""

__version__ = "0.1.0"

from .models import LoadedClip, PretrainedUnavailableError, load_clip, text_fingerprint
from .prompts import PromptedTextEncoder, PromptShapeError
from .text_tower import UnsupportedTextTowerError, encode_tokens

__all__ = [
    "__version__",
    "LoadedClip",
    "PretrainedUnavailableError",
    "PromptShapeError",
    "PromptedTextEncoder",
    "UnsupportedTextTowerError",
    "encode_tokens",
    "load_clip",
    "text_fingerprint",
]
