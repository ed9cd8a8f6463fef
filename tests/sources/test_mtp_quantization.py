"""`--quantize-mtp` (quantship.sources.mtp): DeepSeek-V3's MTP layer quantized with the model.

The MTP layer is fed x_i = eh_proj(cat(enorm(embed(t_{i+1})), hnorm(h_i))) with h_i the main model's
final (normed) hidden state, as vLLM's DeepSeekMTP is. Its input scales are checked against a float64
recomputation: h from the BF16 twin loaded by transformers itself, the MTP front in float64, and the MTP
decoder layer loaded by transformers (config with one more layer) and run in float64. With a token
threshold above the token count, every expert's input scale is the all-token one, so the reference does
not depend on routing. The norms are random (not 1), so h before or after the final norm, or the enorm /
hnorm order, give different scales.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from quantship.errors import QuantshipError
from quantship.pipeline import quantize
from quantship.source import load_source_model
from quantship.streaming.layerwise import stream_quantize
from quantship.verify import verify_checkpoint
from sources.helpers import make_fp8_block_source, save_tiny_deepseek

from tiny_models import save_tiny_model

N = 3  # the tiny model's decoder layers; the MTP layer is model.layers.3
MTP = f"model.layers.{N}."
NVFP4_MAX = 6.0 * 448.0


def _random_norms(folder: Path) -> None:
    """Every norm weight of every shard drawn from [0.5, 1.5] (seeded), so norms are not no-ops."""
    g = torch.Generator().manual_seed(7)
    for f in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(f))
        for name, t in tensors.items():
            if "norm" in name and t.dim() == 1:
                tensors[name] = (0.5 + torch.rand(t.shape, generator=g)).to(t.dtype)
        save_file(tensors, str(f), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def fp8_source(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mtp")
    bf16 = save_tiny_deepseek(root / "bf16")
    _random_norms(bf16)
    return make_fp8_block_source(bf16, root / "fp8", root / "fp8-twin")


@pytest.fixture(scope="module")
def calib() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, 256, (2, 20), generator=g)} for _ in range(2)]


@pytest.fixture(scope="module")
def in_memory(fp8_source, calib, tmp_path_factory) -> Path:
    source, _ = fp8_source
    model, _ = load_source_model(str(source))
    qm = quantize(model, "nvfp4", calib, kv_cache="fp8", moe_min_tokens=10**6, progress=False, mtp_source=source)
    return qm.export(tmp_path_factory.mktemp("mtp-out") / "mem", source_dir=source, progress=False)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _rms64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@torch.no_grad()
def _reference_input_amax(twin: Path, calib) -> dict[str, float]:
    """float64 amax of every MTP module's input, over all tokens, per checkpoint module name."""
    config = AutoConfig.from_pretrained(twin)
    config.num_hidden_layers = N + 1  # transformers loads model.layers.N (the MTP decoder layer) itself
    model = AutoModelForCausalLM.from_pretrained(twin, config=config, dtype=torch.bfloat16,
                                                 experts_implementation="eager").eval()  # grouped_mm: no float64
    model.config.num_hidden_layers = N  # ... and its forward runs the main layers only
    raw = _tensors(twin)
    eps = config.rms_norm_eps
    layer = model.model.layers[N].double()
    amax: dict[str, float] = {}

    def linear_hook(name):
        def hook(_m, args):
            amax[name] = max(amax.get(name, 0.0), float(args[0].abs().max()))
        return hook

    moe_in: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(linear_hook(MTP + n)) for n, m in layer.named_modules()
             if isinstance(m, torch.nn.Linear)]
    hooks.append(layer.mlp.register_forward_pre_hook(lambda _m, args: moe_in.append(args[0].reshape(-1, args[0].shape[-1]))))
    for batch in calib:
        ids = batch["input_ids"]
        h = model.model(input_ids=ids).last_hidden_state.double()  # after the final norm
        e = raw[MTP + "embed_tokens.weight"].double()[ids[:, 1:]]
        x = torch.cat([_rms64(e, raw[MTP + "enorm.weight"], eps), _rms64(h[:, :-1], raw[MTP + "hnorm.weight"], eps)], -1)
        x = x @ raw[MTP + "eh_proj.weight"].double().T
        pos = torch.arange(x.shape[1]).unsqueeze(0)
        layer(x, attention_mask=None, position_embeddings=model.model.rotary_emb(x, pos), position_ids=pos)
    for hk in hooks:
        hk.remove()
    xs = torch.cat(moe_in)
    gate_up = layer.mlp.experts.gate_up_proj  # [E, 2I, H], gate rows first
    inter = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        amax[f"{MTP}mlp.experts.{e}.gate_proj"] = amax[f"{MTP}mlp.experts.{e}.up_proj"] = float(xs.abs().max())
        gate, up = xs @ gate_up[e, :inter].T, xs @ gate_up[e, inter:].T
        amax[f"{MTP}mlp.experts.{e}.down_proj"] = float((torch.nn.functional.silu(gate) * up).abs().max())
    return amax


def test_quantized_mtp_layer_has_input_scales_of_its_real_activations(fp8_source, calib, in_memory):
    _, twin = fp8_source
    tensors = _tensors(in_memory)
    quantized = sorted({n.rsplit(".", 1)[0] for n in tensors if n.startswith(MTP) and n.endswith(".input_scale")})
    assert len(quantized) == 5 + 3 + 64 * 3  # MLA projections, shared expert, 64 experts x 3
    for m in quantized:
        w, ws = tensors[f"{m}.weight"], tensors[f"{m}.weight_scale"]
        assert w.dtype == torch.uint8 and ws.dtype == torch.float8_e4m3fn and ws.shape[1] * 8 == w.shape[1]
        assert tensors[f"{m}.weight_scale_2"].shape == () and tensors[f"{m}.input_scale"].shape == ()
    reference = _reference_input_amax(twin, calib)
    assert set(quantized) <= set(reference)
    ratio = torch.tensor([float(tensors[f"{m}.input_scale"]) * NVFP4_MAX / reference[m] for m in quantized])
    print(f"quantship / float64 input amax: {float(ratio.min()):.5f} .. {float(ratio.max()):.5f}")
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=0.02), [m for m, r in zip(quantized, ratio, strict=True) if abs(r - 1) > 0.02]
    # q_a and kv_a (vLLM's fused_qkv_a_proj) share their scales; k/v cache scales for the MTP attention.
    for leaf in ("input_scale", "weight_scale_2"):
        assert torch.equal(tensors[f"{MTP}self_attn.q_a_proj.{leaf}"], tensors[f"{MTP}self_attn.kv_a_proj_with_mqa.{leaf}"])
    assert f"{MTP}self_attn.k_proj.k_scale" in tensors
    # weight_scale_2 from the (dequantized) source weight: amax / (6 * 448)
    w = _tensors(twin)[f"{MTP}mlp.experts.5.down_proj.weight"].double()
    assert float(tensors[f"{MTP}mlp.experts.5.down_proj.weight_scale_2"]) == pytest.approx(float(w.abs().max()) / NVFP4_MAX, rel=1e-6)


def test_quantized_mtp_layer_leaves_the_exclude_list_but_its_head_and_projection(fp8_source, in_memory):
    tensors = _tensors(in_memory)
    exclude = json.loads((in_memory / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert sorted(e for e in exclude if e.startswith(MTP)) == [
        f"{MTP}eh_proj", f"{MTP}embed_tokens", f"{MTP}mlp.gate", f"{MTP}shared_head.head"]
    for name in ("eh_proj.weight", "shared_head.head.weight", "embed_tokens.weight", "enorm.weight", "hnorm.weight",
                 "shared_head.norm.weight"):
        assert tensors[MTP + name].dtype == torch.bfloat16
    extras = json.loads((in_memory / "source_extras.json").read_text()) if (in_memory / "source_extras.json").exists() else {}
    assert not extras.get("mtp_tensors")  # nothing of the MTP layer is carried outside its quantized section
    info = json.loads((in_memory / "mtp_quantization.json").read_text())
    assert info["mtp_layer"] == MTP[:-1] and info["coverage"][f"{MTP}mlp"]["fallback_experts"] == 64
    assert verify_checkpoint(in_memory).ok


def test_streaming_quantizes_the_mtp_layer_as_in_memory(fp8_source, calib, in_memory, tmp_path):
    source, _ = fp8_source
    streamed = stream_quantize(source, "nvfp4", calib, tmp_path / "streamed", kv_cache="fp8", moe_min_tokens=10**6,
                               device="cpu", progress=False, quantize_mtp=True)
    names = sorted(p.name for p in in_memory.iterdir())
    assert names == sorted(p.name for p in streamed.iterdir())
    for f in names:
        assert (streamed / f).read_bytes() == (in_memory / f).read_bytes(), f


def test_quantize_mtp_without_an_mtp_layer_is_a_one_line_error(tmp_path, calib):
    folder = save_tiny_model("llama", tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    with pytest.raises(QuantshipError, match="0 MTP layers") as e:
        quantize(model, "nvfp4", calib, progress=False, mtp_source=folder)
    assert "\n" not in str(e.value)
