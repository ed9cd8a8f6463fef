"""The whole pipeline on a remote-code MoE model laid out like Kimi-K2 / DeepSeek-V3's
`modeling_deepseek.py` (tests/remote_moe): experts are one `nn.Linear` per projection in an
`nn.ModuleList`, the router `MoEGate` is a bare `weight` Parameter, and inference calls each
expert only on the tokens routed to it.

The tiny model uses the real SmolLM2 tokenizer (vocabulary 49152, the model's `vocab_size`
matches), so `load_source_model` loads model and tokenizer exactly as for a real checkpoint and
calibration text is real text. One calibration sequence of 8 tokens leaves most of the 48
experts of each MoE layer without a routed token: their input scales must come from the
all-token fallback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from quantship.calibration.observers import Calibrator
from quantship.errors import QuantshipError
from quantship.load import load_quantized
from quantship.model.discover import discover
from quantship.pipeline import DEFAULT_MOE_MIN_TOKENS, QuantizedModel, quantize
from quantship.recipes import get_kv_cache_format, get_recipe
from quantship.scales import excluded_modules
from quantship.source import load_source_model
from quantship.verify import verify_checkpoint

from remote_moe.builder import save_remote_moe_model

N_EXPERTS, TOP_K, LAYERS, FIRST_DENSE = 48, 6, 3, 1
MOE_LAYERS = range(FIRST_DENSE, LAYERS)
SEQ = 8
NVFP4_AMAX = 6 * 448  # input_scale = amax / (6 * 448)
SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")
PROJS = ("gate_proj", "up_proj", "down_proj")
CALIB_TEXT = "The old lighthouse keeper climbed the stairs every evening to light the lamp."
EVAL_TEXT = "Rivers carry sand and silt from the mountains down to the wide and quiet sea, slowly."


@dataclass
class Quantized:
    qm: QuantizedModel
    export_dir: Path
    moe_inputs: dict[str, torch.Tensor]  # MoE block name -> its input during calibration
    calib_ids: torch.Tensor


def _ids(tokenizer, text: str, n: int | None = None) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return ids[:, :n] if n else ids


def _read(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():  # noqa: SIM118 - safe_open has no iterator
                out[k] = fh.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory, smollm2_dir) -> Path:
    return save_remote_moe_model(tmp_path_factory.mktemp("tinymoe_remote"), seed=0, n_experts=N_EXPERTS,
                                 top_k=TOP_K, layers=LAYERS, first_k_dense=FIRST_DENSE, tokenizer_dir=smollm2_dir)


@pytest.fixture(scope="module")
def source(remote_dir):
    return load_source_model(str(remote_dir), trust_remote_code=True)


@pytest.fixture(scope="module")
def quantized(source, remote_dir, tmp_path_factory) -> Quantized:
    model, tokenizer = source
    calib_ids = _ids(tokenizer, CALIB_TEXT, SEQ)
    assert calib_ids.shape == (1, SEQ)
    moe_inputs: dict[str, torch.Tensor] = {}
    handles = []
    for block in discover(model).moe_blocks:
        def keep(_m, args, name=block.name):
            assert name not in moe_inputs, "one calibration batch: the block runs once"
            moe_inputs[name] = args[0].detach().clone()

        handles.append(block.module.register_forward_pre_hook(keep))
    try:
        batches = [{"input_ids": calib_ids, "attention_mask": torch.ones_like(calib_ids)}]
        qm = quantize(model, "nvfp4", batches, progress=False)
    finally:
        for h in handles:
            h.remove()
    export_dir = qm.export(tmp_path_factory.mktemp("export") / "nvfp4", source_dir=remote_dir, progress=False)
    return Quantized(qm, export_dir, moe_inputs, calib_ids)


def test_loads_only_with_trust_remote_code(remote_dir, source):
    with pytest.raises(QuantshipError, match="--trust-remote-code"):
        load_source_model(str(remote_dir))
    model, tokenizer = source
    assert type(model).__module__.startswith("transformers_modules.")  # the folder's own code
    assert model.config.vocab_size == len(tokenizer) == 49152


def test_discover_finds_module_list_experts(source):
    model, _ = source
    structure = discover(model)
    assert [b.name for b in structure.moe_blocks] == [f"model.layers.{i}.mlp" for i in MOE_LAYERS]
    for block in structure.moe_blocks:
        assert block.fused is None
        assert block.experts_name == f"{block.name}.experts"
        assert block.num_experts == len(block.expert_modules) == N_EXPERTS
        assert block.router_names == [f"{block.name}.gate"]
    roles = {t.name: t.role for t in structure.linears}
    for i in MOE_LAYERS:
        for e in range(N_EXPERTS):
            for p in PROJS:
                assert roles[f"model.layers.{i}.mlp.experts.{e}.{p}"] == "expert"
        for p in PROJS:
            assert roles[f"model.layers.{i}.mlp.shared_experts.{p}"] == "shared_expert"
        # The router is a bare Parameter, not a Linear; it is excluded through the block.
        assert not any(n.startswith(f"model.layers.{i}.mlp.gate") for n in roles)
    assert {roles[f"model.layers.0.mlp.{p}"] for p in PROJS} == {"mlp"}
    assert roles["lm_head"] == "lm_head"
    assert sum(r == "expert" for r in roles.values()) == len(MOE_LAYERS) * N_EXPERTS * 3
    assert [n for n, _ in structure.attention_modules] == [f"model.layers.{i}.self_attn" for i in range(LAYERS)]
    excluded = excluded_modules(structure, get_recipe("nvfp4"), [])
    assert excluded == {
        "lm_head": "lm_head", **{f"model.layers.{i}.mlp.gate": "router" for i in MOE_LAYERS}
    }


def test_coverage_most_experts_without_tokens(quantized):
    cov = quantized.qm.plan.coverage
    assert sorted(cov) == [f"model.layers.{i}.mlp" for i in MOE_LAYERS]
    for c in cov.values():
        assert c.min_tokens == DEFAULT_MOE_MIN_TOKENS
        assert int(c.tokens.sum()) == SEQ * TOP_K  # every (token, expert) pair counted once
        assert int((c.tokens == 0).sum()) > N_EXPERTS // 2  # most experts saw no token
        assert bool(c.fallback.all())  # 8 tokens: every expert is under the threshold


def test_export_every_expert_complete(quantized):
    t = _read(quantized.export_dir)
    for i in MOE_LAYERS:
        for e in range(N_EXPERTS):
            ex = f"model.layers.{i}.mlp.experts.{e}"
            for p, (out, inp) in zip(PROJS, ((32, 64), (32, 64), (64, 32)), strict=True):
                m = f"{ex}.{p}"
                assert t[f"{m}.weight"].dtype == torch.uint8 and t[f"{m}.weight"].shape == (out, inp // 2)
                ws = t[f"{m}.weight_scale"]
                assert ws.dtype == torch.float8_e4m3fn and ws.shape == (out, inp // 16)
                assert torch.isfinite(ws.float()).all() and (ws.float() > 0).all(), m
                for s in ("weight_scale_2", "input_scale"):
                    v = t[f"{m}.{s}"]
                    assert v.dtype == torch.float32 and v.shape == (), f"{m}.{s}"
                    assert torch.isfinite(v) and v > 0, f"{m}.{s}"
            for s in ("weight_scale_2", "input_scale"):  # gate/up load as one w13 GEMM
                assert torch.equal(t[f"{ex}.gate_proj.{s}"], t[f"{ex}.up_proj.{s}"]), f"{ex} {s}"


def test_export_names_configs_and_verify(quantized, remote_dir):
    exported = _read(quantized.export_dir)
    source_names = set(load_file(str(remote_dir / "model.safetensors")))
    weights = {k for k in exported if k.rsplit(".", 1)[1] not in SCALE_SUFFIXES}
    assert weights == source_names  # the original checkpoint's names, nothing renamed or dropped
    quantized_modules = {k.rsplit(".", 1)[0] for k in exported if k.endswith(".input_scale")}
    linears = {k.rsplit(".", 1)[0] for k in source_names if k.endswith("proj.weight")}
    assert quantized_modules == linears  # every attention/MLP/expert linear, nothing else

    hf = json.loads((quantized.export_dir / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "NVFP4"
    assert hf["exclude_modules"] == ["lm_head", *(f"model.layers.{i}.mlp.gate" for i in MOE_LAYERS)]
    config = json.loads((quantized.export_dir / "config.json").read_text())
    assert config["model_type"] == "tinymoe_remote"
    assert config["auto_map"] == json.loads((remote_dir / "config.json").read_text())["auto_map"]
    for f in ("configuration_tinymoe.py", "modeling_tinymoe.py", "tokenizer.json"):
        assert (quantized.export_dir / f).read_bytes() == (remote_dir / f).read_bytes(), f

    result = verify_checkpoint(quantized.export_dir)
    assert result.ok, result.summary()
    assert result.n_quantized_modules == len(linears)


def test_fallback_input_scales_from_all_tokens(quantized, remote_dir):
    """Recompute, in float64 from the source weights, the input scales of experts that got no
    routed token: all calibration tokens pushed through them.

    gate/up: amax of the MoE block input (bf16 values, exact in float64), so the only error is
    float32 division: rtol 1e-6 (that exact check also proves the token set is all tokens).
    down: the model computes silu(x Wg^T) * (x Wu^T) in bf16, rounding four times (two matmul
    outputs, silu, product) by up to 2^-9 each, slightly amplified by silu: about 1% in all
    (0.94% at most measured here); rtol 2e-2 leaves margin and still tells a wrong formula apart.
    """
    exported = _read(quantized.export_dir)
    src = {k: v.double() for k, v in load_file(str(remote_dir / "model.safetensors")).items()}
    checked = 0
    for block, cov in quantized.qm.plan.coverage.items():
        x = quantized.moe_inputs[block].double().reshape(-1, 64)
        assert x.shape[0] == SEQ
        for e in (cov.tokens == 0).nonzero().flatten().tolist():
            ex = f"{block}.experts.{e}"
            gate_in = x.abs().amax() / NVFP4_AMAX
            for p in ("gate_proj", "up_proj"):
                got = exported[f"{ex}.{p}.input_scale"].double()
                torch.testing.assert_close(got, gate_in, rtol=1e-6, atol=0, msg=f"{ex}.{p}")
            h = F.silu(x @ src[f"{ex}.gate_proj.weight"].T) * (x @ src[f"{ex}.up_proj.weight"].T)
            down_in = h.abs().amax() / NVFP4_AMAX
            got = exported[f"{ex}.down_proj.input_scale"].double()
            torch.testing.assert_close(got, down_in, rtol=2e-2, atol=0, msg=f"{ex}.down_proj")
            checked += 1
    assert checked > len(MOE_LAYERS) * N_EXPERTS // 2


def test_calibration_leaves_the_output_unchanged(source, quantized):
    model, _ = source
    ids = quantized.calib_ids
    structure = discover(model)
    recipe, kv = get_recipe("nvfp4"), get_kv_cache_format("none")
    calibrator = Calibrator(model, structure, recipe, kv, DEFAULT_MOE_MIN_TOKENS,
                            set(excluded_modules(structure, recipe, [])))
    with torch.no_grad():
        plain = model(ids).logits
        with calibrator.attached() as stats:
            observed = model(ids).logits
        after = model(ids).logits
    assert stats.fallback_amax  # the all-token side pass did run
    assert torch.equal(observed, plain)
    assert torch.equal(after, plain)  # and every hook came off


def test_reload_matches_in_memory_fake_quant(source, quantized):
    """The reloaded checkpoint computes exactly what the in-memory fake-quant model computes:
    the same dequantized bf16 weights and input scales through the same model code, so the
    logits are compared bit for bit (tolerance 0)."""
    model, tokenizer = source
    ids = _ids(tokenizer, EVAL_TEXT)
    loaded = load_quantized(quantized.export_dir, trust_remote_code=True)
    assert type(loaded.model).__module__.startswith("transformers_modules.")
    assert len(loaded.input_scales) == len(quantized.qm.plan.targets)
    with torch.no_grad():
        plain = model(ids).logits
        with quantized.qm.fake_quantized() as m:
            in_memory = m(ids).logits
        with loaded.fake_quantized() as m:
            reloaded = m(ids).logits
    assert not torch.equal(in_memory, plain)  # fake quantization does act
    assert torch.equal(reloaded, in_memory)


def test_export_without_source_dir_carries_model_code(quantized, tmp_path):
    out = quantized.qm.export(tmp_path / "api", progress=False)
    assert (out / "modeling_tinymoe.py").is_file() and (out / "configuration_tinymoe.py").is_file()
    loaded = load_quantized(out, trust_remote_code=True)
    assert [b.name for b in loaded.structure.moe_blocks] == [f"model.layers.{i}.mlp" for i in MOE_LAYERS]
