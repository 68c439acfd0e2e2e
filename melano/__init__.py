"""melano: melanoma detection with CycleGAN oversampling. See README.md."""

__version__ = "0.1.0"
