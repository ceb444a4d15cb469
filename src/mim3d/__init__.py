"""mim3d: MiM (Mask in Mask) self-supervised pre-training for 3D medical images."""

__version__ = "0.1.0"
