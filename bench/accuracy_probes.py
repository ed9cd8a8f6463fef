"""Two probes behind bench/README's reading of bench/accuracy.py (SmolLM2, 20 calibration
windows, the same 8 x 256 held-out windows):

- fp8: where W8A8 per-tensor FP8 loses — weights only (shared fused-sibling scale, or each
  module's own), activations only, both;
- nvfp4: how much the perplexity moves when every input scale is scaled by 0.98 / 1.02 / 1.05,
  i.e. what a few percent of amax difference between tools is worth.

    HF_HUB_OFFLINE=1 python -P bench/accuracy_probes.py > probes.json
"""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantship.calibration.data import build_calibration_batches, load_documents, split_documents
from quantship.default_model import default_model_dir
from quantship.evaluate import eval_batches, perplexity
from quantship.fake_quant import activation_fake_quant, swapped_weights
from quantship.pipeline import quantize


def fp8_decomposition(m, calib, ev, bf16: float) -> dict:
    qm = quantize(m, "fp8", calib, progress=False)
    h, params = qm.plan.handler, dict(m.named_parameters())

    def swaps(own_scale: bool) -> dict:
        out = {}
        for t in qm.plan.targets:
            sc = h.scales(t.weight.abs().amax().float(), t.input_amax) if own_scale else t.scales
            out[f"{t.key}.weight"] = (params[f"{t.key}.weight"], h.dequantize(h.quantize(t.weight, sc), t.weight.dtype))
        return out

    res = {}
    with swapped_weights(swaps(False)):
        res["weights_only_shared_sibling_scale"] = perplexity(m, ev, progress=False) / bf16
    with swapped_weights(swaps(True)):
        res["weights_only_own_scale"] = perplexity(m, ev, progress=False) / bf16
    with activation_fake_quant(qm.structure, h, qm.input_scales()):
        res["activations_only"] = perplexity(m, ev, progress=False) / bf16
    with qm.fake_quantized():
        res["both"] = perplexity(m, ev, progress=False) / bf16
    return res


def nvfp4_input_scale_sensitivity(m, calib, ev, bf16: float) -> dict:
    qm = quantize(m, "nvfp4", calib, progress=False)
    base = {t.key: dict(t.scales) for t in qm.plan.targets}
    res = {}
    for factor in (1.0, 0.98, 1.02, 1.05):
        for t in qm.plan.targets:
            t.scales = {**base[t.key], "input_scale": base[t.key]["input_scale"] * factor}
        with qm.fake_quantized():
            res[str(factor)] = perplexity(m, ev, progress=False) / bf16
    return res


def main() -> None:
    torch.set_num_threads(1)
    d = default_model_dir()
    tok = AutoTokenizer.from_pretrained(d)
    calib = build_calibration_batches(tok, split_documents(load_documents(None), "calib"), 20, 512, 8)
    ev = eval_batches(tok, None, 8, 256, 4)
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    bf16 = perplexity(m, ev, progress=False)
    print(json.dumps({"bf16_perplexity": bf16, "fp8_ratio": fp8_decomposition(m, calib, ev, bf16),
                      "nvfp4_ratio_by_input_scale_factor": nvfp4_input_scale_sensitivity(m, calib, ev, bf16)},
                     indent=1))


if __name__ == "__main__":
    main()
