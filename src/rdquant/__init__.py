"""rdquant: compress a trained causal LM post-training, save a real packed artifact, load, evaluate.

Public API: compress, load (artifacts and originals), load_original, load_tokenizer, evaluate, inspect,
export, CompressConfig.
"""

__version__ = "0.1.0"

from .compress import CompressedModel, compress  # noqa: E402
from .config import CompressConfig  # noqa: E402
from .errors import ArtifactError, RdquantError  # noqa: E402
from .evaluate import EvalResult, evaluate  # noqa: E402
from .export import export  # noqa: E402
from .loading import load, load_original, load_tokenizer  # noqa: E402
from .report import InspectReport, inspect  # noqa: E402

__all__ = [
    "ArtifactError", "CompressConfig", "CompressedModel", "EvalResult", "InspectReport", "RdquantError",
    "compress", "evaluate", "export", "inspect", "load", "load_original", "load_tokenizer", "__version__",
]
