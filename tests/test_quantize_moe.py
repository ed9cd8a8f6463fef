"""The foundation's promise on MoE models: with a tiny calibration set, where most experts get no
routed token, every expert still exports complete, finite, consistent NVFP4 tensors whose input
scales come from real activations; `verify` passes the result and catches tampering."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quantship.cli import main as cli_main
from quantship.errors import QuantshipError
from quantship.formats import nvfp4
from quantship.load import load_quantized
from quantship.pipeline import quantize
from quantship.source import load_source_model

from tiny_models import save_tiny_model

# kind -> (experts per MoE layer, MoE layers, projection names gate/up/down in the checkpoint)
MOE_CASES = {
    "qwen3_moe": (32, 2, ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v3": (64, 2, ("gate_proj", "up_proj", "down_proj")),
    "mixtral": (8, 2, ("w1", "w3", "w2")),
}
EXPERT_RE = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.(weight|weight_scale|weight_scale_2|input_scale)$")


def _calib_batches(seed: int = 0, tokens: int = 6) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (1, tokens), generator=g)}]


def _read_all(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module", params=list(MOE_CASES))
def moe_export(request, tmp_path_factory):
    kind = request.param
    src = save_tiny_model(kind, tmp_path_factory.mktemp(kind) / "src")
    model = load_source_model_no_tokenizer(src)
    batches = _calib_batches()
    qm = quantize(model, "nvfp4", batches, kv_cache="fp8", progress=False)
    out = tmp_path_factory.mktemp(kind) / "export"
    qm.export(out, progress=False)
    return kind, src, qm, out, batches


def load_source_model_no_tokenizer(src: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()


def test_many_experts_get_no_routed_token(moe_export):
    kind, _, qm, out, _ = moe_export
    coverage = json.loads((out / "coverage.json").read_text())
    n_exp, n_layers, _ = MOE_CASES[kind]
    assert len(coverage["blocks"]) == n_layers
    for info in coverage["blocks"].values():
        assert info["num_experts"] == n_exp
        assert sum(info["tokens_per_expert"]) == 6 * qm.model.config.num_experts_per_tok
        assert len(info["experts_without_tokens"]) >= 1
        assert set(info["experts_without_tokens"]) <= set(info["fallback_experts"])
    assert "MoE expert coverage" in (out / "report.md").read_text()


def test_every_expert_has_every_tensor_finite_and_positive(moe_export):
    kind, _, _, out, _ = moe_export
    n_exp, n_layers, projs = MOE_CASES[kind]
    tensors = _read_all(out)
    found: dict[tuple[str, int, str], dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = EXPERT_RE.match(name)
        if m:
            found.setdefault((m[1], int(m[2]), m[3]), {})[m[4]] = t
    assert len(found) == n_exp * n_layers * 3
    for (_, _, proj), parts in found.items():
        assert proj in projs
        assert set(parts) == {"weight", "weight_scale", "weight_scale_2", "input_scale"}
        assert parts["weight"].dtype == torch.uint8
        assert parts["weight_scale"].dtype == torch.float8_e4m3fn
        assert parts["weight_scale"].shape == (parts["weight"].shape[0], parts["weight"].shape[1] * 2 // 16)
        for s in ("weight_scale_2", "input_scale"):
            assert parts[s].dtype == torch.float32 and parts[s].dim() == 0
        for s in ("weight_scale", "weight_scale_2", "input_scale"):
            v = parts[s].float()
            assert torch.isfinite(v).all() and (v > 0).all(), (proj, s)
    gate, up, _ = projs
    for (experts, e, proj), parts in found.items():
        if proj == gate:
            sibling = found[(experts, e, up)]
            assert torch.equal(parts["weight_scale_2"], sibling["weight_scale_2"])
            assert torch.equal(parts["input_scale"], sibling["input_scale"])


def test_dense_qkv_and_shared_expert_siblings_share_scales(moe_export):
    _, _, _, out, _ = moe_export
    tensors = _read_all(out)
    qs = [n[: -len(".q_proj.weight")] for n in tensors if n.endswith(".q_proj.weight")]
    for attn in qs:
        for s in ("weight_scale_2", "input_scale"):
            vals = [tensors[f"{attn}.{p}.{s}"] for p in ("q_proj", "k_proj", "v_proj")]
            assert all(torch.equal(vals[0], v) for v in vals)


def test_exclude_list_names_lm_head_and_routers(moe_export):
    kind, _, qm, out, _ = moe_export
    hf = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "NVFP4" and hf["group_size"] == 16 and hf["kv_cache_quant_algo"] == "FP8"
    excluded = set(hf["exclude_modules"])
    assert "lm_head" in excluded
    tensors = _read_all(out)
    routers = {n[: -len(".weight")] for n in tensors if re.search(r"\.(gate|mlp\.gate)\.weight$", n)}
    assert routers and routers <= excluded
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    assert set(config["quantization_config"]["ignore"]) == excluded


def test_names_are_the_source_checkpoint_names(moe_export):
    _, src, _, out, _ = moe_export
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        source = set(f.keys())
    exported = set(_read_all(out))
    scale_suffixes = (".weight_scale", ".weight_scale_2", ".input_scale", ".k_scale", ".v_scale")
    assert {n for n in exported if not n.endswith(scale_suffixes)} == source


def test_dequantized_export_equals_fake_quant_of_source_weights(moe_export):
    """Independent of the exporter: quantize each source tensor with the format functions, the
    group's global scale taken as max over the fused siblings, and compare to the export."""
    kind, src, _, out, _ = moe_export
    source = load_file(str(src / "model.safetensors"))
    tensors = _read_all(out)
    gate, up, _ = MOE_CASES[kind][2]
    checked = 0
    for name in tensors:
        if not name.endswith(".weight_scale_2"):
            continue
        module = name[: -len(".weight_scale_2")]
        parent, leaf = module.rsplit(".", 1)
        siblings = {"q_proj": ("q_proj", "k_proj", "v_proj"), gate: (gate, up), up: (gate, up)}.get(leaf, (leaf,))
        if leaf in ("k_proj", "v_proj"):
            siblings = ("q_proj", "k_proj", "v_proj")
        if leaf in ("q_a_proj", "kv_a_proj_with_mqa"):
            siblings = ("q_a_proj", "kv_a_proj_with_mqa")
        amax = max(source[f"{parent}.{s}.weight"].float().abs().max() for s in siblings)
        expected = nvfp4.fake_quantize_nvfp4_weight(source[f"{module}.weight"], nvfp4.global_scale_from_amax(amax))
        got = nvfp4.dequantize_nvfp4(tensors[f"{module}.weight"], tensors[f"{module}.weight_scale"],
                                     tensors[name], dtype=torch.bfloat16)
        assert torch.equal(expected, got), module
        checked += 1
    assert checked >= 3 * MOE_CASES[kind][0] * MOE_CASES[kind][1]


def test_reloaded_export_reproduces_fake_quant_logits(moe_export):
    _, _, qm, out, _ = moe_export
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with qm.fake_quantized() as m:
            expected = m(ids).logits
        loaded = load_quantized(out)
        with loaded.fake_quantized() as m:
            got = loaded.model(ids).logits
        plain = qm.model(ids).logits
    # Same dequantized weights, same activation fake-quant: bit-identical on the same machine.
    assert torch.equal(expected, got)
    # ... and fake quantization did change the output (the hooks are live).
    assert not torch.equal(expected, plain)


def test_verify_passes_then_fails_on_each_tampering(moe_export, tmp_path, capsys):
    kind, _, _, out, _ = moe_export
    assert cli_main(["verify", str(out)]) == 0
    tensors = _read_all(out)
    victim = next(n for n in sorted(tensors) if ".experts.5." in n and n.endswith(".input_scale"))
    for label, mutate in {
        "deleted": lambda t: t.pop(victim),
        "nan": lambda t: t.__setitem__(victim, torch.tensor(float("nan"))),
        "zero": lambda t: t.__setitem__(victim, torch.tensor(0.0)),
        "negative": lambda t: t.__setitem__(victim, torch.tensor(-1.0)),
    }.items():
        bad = tmp_path / f"{kind}-{label}"
        bad.mkdir()
        for f in out.iterdir():
            if f.suffix != ".safetensors":
                (bad / f.name).write_bytes(f.read_bytes())
        copy = dict(tensors)
        mutate(copy)
        save_file(copy, str(bad / "model.safetensors"), metadata={"format": "pt"})
        capsys.readouterr()
        assert cli_main(["verify", str(bad)]) == 1, label
        assert victim.rsplit(".", 1)[0] in capsys.readouterr().out, label


def test_fallback_input_scales_come_from_all_calibration_tokens(moe_export):
    """An expert that no token was routed to: its input amax equals the amax over every
    calibration token pushed through it, recomputed here in float64 from the weights."""
    kind, _, qm, _, batches = moe_export
    block = qm.structure.moe_blocks[0]
    fe = block.fused
    coverage = qm.plan.coverage[block.name]
    cold = int((coverage.tokens == 0).nonzero()[0])
    captured = []
    handle = block.module.register_forward_pre_hook(lambda _m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            qm.model(**b)
    handle.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double()
    gate_up = fe.gate_up[cold].detach().double()
    inter = fe.intermediate_size
    h = torch.nn.functional.silu(x @ gate_up[:inter].T) * (x @ gate_up[inter:].T)
    gu_scale = qm.plan.target(f"{fe.name}.{fe.gate_up_param}").scales["input_scale"][cold]
    dn_scale = qm.plan.target(f"{fe.name}.{fe.down_param}").scales["input_scale"][cold]
    assert float(gu_scale) == pytest.approx(float(x.abs().max()) / (6 * 448), rel=1e-6)
    # bf16 GEMMs in the model vs float64 here: a few bf16 ulps.
    assert float(dn_scale) == pytest.approx(float(h.abs().max()) / (6 * 448), rel=2e-2)


def test_calibration_does_not_change_the_model_output(moe_export):
    """The all-token fallback runs on the side: outputs with and without it are identical, and
    our observed forward agrees with transformers' own experts forward to bf16 rounding."""
    _, _, qm, _, batches = moe_export
    from quantship.calibration.observers import Calibrator
    from quantship.recipes import get_kv_cache_format, get_recipe

    outputs = {}
    with torch.no_grad():
        plain = qm.model(**batches[0]).logits
        for min_tokens in (0, 10**9):
            cal = Calibrator(qm.model, qm.structure, get_recipe("nvfp4"), get_kv_cache_format("fp8"),
                             min_tokens, set())
            with cal.attached():
                outputs[min_tokens] = qm.model(**batches[0]).logits
    assert torch.equal(outputs[0], outputs[10**9])
    ulp = plain.abs().max().float() * 2**-7
    assert (outputs[0].float() - plain.float()).abs().max() <= 2 * ulp


def test_without_fallback_an_unreached_expert_stops_the_export(tmp_path):
    src = save_tiny_model("qwen3_moe", tmp_path / "src")
    model = load_source_model_no_tokenizer(src)
    with pytest.raises(QuantshipError, match=r"input amax of .*experts.* is zero.*experts \[0"):
        quantize(model, "nvfp4", _calib_batches(), moe_min_tokens=0, progress=False)


def test_tiny_model_dirs_load_through_the_real_loader(tmp_path):
    src = save_tiny_model("deepseek_v3", tmp_path / "src")
    with pytest.raises(QuantshipError, match="tokenizer"):
        load_source_model(str(src))
