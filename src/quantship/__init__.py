"""quantship: post-training quantization of Hugging Face LLMs to servable NVFP4/FP8 checkpoints.

    model, tokenizer = quantship.load_source_model("./my-model")
    qm = quantship.quantize(model, "nvfp4", calib_batches)
    qm.export("./my-model-nvfp4")
    quantship.verify_checkpoint("./my-model-nvfp4").ok
"""

__version__ = "0.1.0"

from quantship.pipeline import QuantizedModel, quantize  # noqa: E402
from quantship.source import load_source_model  # noqa: E402
from quantship.verify import verify_checkpoint  # noqa: E402

__all__ = ["QuantizedModel", "__version__", "load_source_model", "quantize", "verify_checkpoint"]
