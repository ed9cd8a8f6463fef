"""quantship: post-training quantization of Hugging Face LLMs to servable NVFP4/FP8 checkpoints."""

__version__ = "0.1.0"
