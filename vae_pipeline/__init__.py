"""vae-pipeline: retrain, evaluate, register and promote convolutional VAEs."""

__version__ = "0.1.0"
