"""Training: one Trainer that is a single process or one torchrun rank, plus its launcher."""

from vae_pipeline.train.checkpoint import load_model, save_model
from vae_pipeline.train.step import TrainingError
from vae_pipeline.train.trainer import Trainer

__all__ = ["Trainer", "TrainingError", "load_model", "save_model"]
