"""mednist-gan: train MONAI's MedNIST Hand GAN from a CPU debug run to many GPUs on many nodes."""

__version__ = "0.1.0"
