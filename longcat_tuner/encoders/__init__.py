"""Text encoder (umT5 through transformers) and video VAE (diffusers' AutoencoderKLWan) of a LongCat-Video checkpoint."""
from longcat_tuner.encoders.text import TextEncoder, clean_prompt
from longcat_tuner.encoders.vae import VideoVAE

__all__ = ["TextEncoder", "VideoVAE", "clean_prompt"]
