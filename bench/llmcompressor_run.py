"""Quantize with llm-compressor (run by bench/accuracy.py in its own throwaway venv, since
llmcompressor 0.14 pins compressed-tensors 0.19 while quantship's tests use 0.20).

    VENV/bin/python bench/llmcompressor_run.py MODEL_DIR CALIB.pt SCHEME OUT_DIR

CALIB.pt holds the exact token windows the other tools calibrate on (a list of [B, T] tensors).
SCHEME: nvfp4 (all linears), nvfp4_mlp_only (attention ignored) or fp8 (static per-tensor), the
compressed-tensors presets NVFP4 / FP8 with lm_head and MoE routers ignored.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM

IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"]
SCHEMES = {"nvfp4": ("NVFP4", []), "nvfp4_mlp_only": ("NVFP4", ["re:.*self_attn.*"]), "fp8": ("FP8", [])}


def main(model_dir: str, calib: str, scheme: str, out: str) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    preset, extra_ignore = SCHEMES[scheme]
    windows = [row for batch in torch.load(calib) for row in batch.tolist()]
    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    recipe = QuantizationModifier(targets="Linear", scheme=preset, ignore=IGNORE + extra_ignore)
    start = time.time()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=len(windows[0]),
            num_calibration_samples=len(windows))
    model.save_pretrained(out, save_compressed=True)
    print(f"llmcompressor {scheme}: {time.time() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
