"""admkit: guided diffusion (ADM, classifier guidance, upsampling, evaluation) on modern PyTorch."""

__version__ = "0.1.0"
