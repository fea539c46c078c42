"""Neural networks: the U-net with convolutional-GRU memories, the RIM built on it, and the VAEs."""

from rimlens.nn.rim import RIM, RIMOutput, rim_loss
from rimlens.nn.unet import ConvGRU, GRUUNet
from rimlens.nn.vae import VAE

__all__ = ["RIM", "VAE", "ConvGRU", "GRUUNet", "RIMOutput", "rim_loss"]
