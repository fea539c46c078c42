"""Neural networks: the U-net with convolutional-GRU memories used by the RIM."""

from rimlens.nn.unet import ConvGRU, GRUUNet, UNetConfig

__all__ = ["ConvGRU", "GRUUNet", "UNetConfig"]
