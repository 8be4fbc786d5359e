"""Baseline trainer: CIFAR-10 data path, MobileNet-v2, the training loop and its analysis.

Imports only torch/torchvision (plus matplotlib for plots); reports through callbacks,
so Ray Tune and MLflow plug in from outside.
"""
from trainer.config import ConfigError, TrainConfig
from trainer.data import CIFAR10_MEAN, CIFAR10_STD, DataError, Dataset, GpuLoader, augment, load_dataset, normalize
from trainer.model import MobileNetV2, count_params
from trainer.zoo import ModelError, build_model, model_from_meta, model_meta
from trainer.train import (Callback, CheckpointError, evaluate, load_checkpoint, resolve_device, save_weights_only,
                           train)

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "Callback", "CheckpointError", "ConfigError", "DataError", "Dataset", "GpuLoader",
    "MobileNetV2", "ModelError", "TrainConfig", "build_model", "model_from_meta", "model_meta", "augment", "count_params", "evaluate", "load_checkpoint", "load_dataset", "resolve_device", "normalize",
    "save_weights_only", "train",
]
