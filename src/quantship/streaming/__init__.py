"""Layer-by-layer quantization of models bigger than the GPU (`quantship quantize --streaming`)."""

from quantship.streaming.layerwise import stream_quantize

__all__ = ["stream_quantize"]
