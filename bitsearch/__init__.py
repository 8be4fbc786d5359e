"""bitsearch: hyperparameter search for quantizing MobileNet-v2 on CIFAR-10."""
__version__ = "0.1.0"
