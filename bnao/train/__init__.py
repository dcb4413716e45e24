"""Stand-alone training of architectures: final training, re-ranking, model files."""

from .checkpoint import CheckpointError, load_file, save_atomic
from .model_file import load_model, save_model
from .api import rerank, train_standalone
from .config import StandaloneConfig, make_config
from .evaluate import count_parameters, evaluate_model
from .epoch import NonFiniteLossError
from .standalone import StandaloneTrainer, resolve_device

__all__ = [
    "CheckpointError",
    "NonFiniteLossError",
    "StandaloneConfig",
    "StandaloneTrainer",
    "count_parameters",
    "evaluate_model",
    "load_file",
    "load_model",
    "make_config",
    "rerank",
    "resolve_device",
    "save_atomic",
    "save_model",
    "train_standalone",
]
