"""verify on hand-built checkpoints: valid ones pass, each planted defect is named.

The builder writes what the producers write (read from their sources and from Model Optimizer's
own export, see tests/verify/test_verify_oracle.py): per quantized linear, modelopt NVFP4
`weight` uint8 [out, in/2], `weight_scale` e4m3 [out, in/16], 0-dim float32 `weight_scale_2` and
`input_scale`; compressed-tensors `weight_packed`, `weight_scale`, float32 [1]
`weight_global_scale` and `input_global_scale`; FP8 `weight` e4m3 with per-tensor scales.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantship.errors import QuantshipError
from quantship.verify import Finding, VerifyResult, verify_checkpoint

H, INTER, I_MOE, N_EXPERTS, KV_DIM, VOCAB = 64, 128, 32, 3, 32, 128
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
L0, L1 = "model.layers.0", "model.layers.1"
EXPERT = f"{L1}.mlp.experts.2.down_proj"


def _linears() -> list[tuple[str, int, int, str]]:
    """(module, out, in, fused-group key): layer 0 dense, layer 1 MoE with per-expert names."""
    out = []
    for layer in (L0, L1):
        attn = f"{layer}.self_attn"
        out += [
            (f"{attn}.{p}", o, H, f"{attn}.qkv")
            for p, o in (("q_proj", H), ("k_proj", KV_DIM), ("v_proj", KV_DIM))
        ]
        out.append((f"{attn}.o_proj", H, H, f"{attn}.o"))
    out += [(f"{L0}.mlp.{p}", INTER, H, f"{L0}.gate_up") for p in ("gate_proj", "up_proj")]
    out.append((f"{L0}.mlp.down_proj", H, INTER, f"{L0}.down"))
    for e in range(N_EXPERTS):
        ex = f"{L1}.mlp.experts.{e}"
        out += [(f"{ex}.{p}", I_MOE, H, f"{ex}.gate_up") for p in ("gate_proj", "up_proj")]
        out.append((f"{ex}.down_proj", H, I_MOE, f"{ex}.down"))
    return out


def _scalar(value: float, layout: str) -> torch.Tensor:
    # Model Optimizer writes 0-dim scales, compressed-tensors [1]: both must pass.
    return torch.tensor(value if layout == "modelopt" else [value], dtype=torch.float32)


def build_tensors(layout: str, algo: str, kv: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    group_scale: dict[str, tuple[float, float]] = {}
    t: dict[str, torch.Tensor] = {}
    for name, o, i, group in _linears():
        w_global, a_scale = group_scale.setdefault(
            group, (1e-5 + rand(1).item() * 1e-4, 1e-4 + rand(1).item() * 1e-3)
        )
        if algo == "NVFP4":
            packed = torch.randint(0, 256, (o, i // 2), generator=g, dtype=torch.uint8)
            t[f"{name}.{'weight' if layout == 'modelopt' else 'weight_packed'}"] = packed
            t[f"{name}.weight_scale"] = (1 + rand(o, i // 16) * 400).to(torch.float8_e4m3fn)
            if layout == "modelopt":
                t[f"{name}.weight_scale_2"] = _scalar(w_global, layout)
                t[f"{name}.input_scale"] = _scalar(a_scale, layout)
            else:  # reciprocals of modelopt's scales
                t[f"{name}.weight_global_scale"] = _scalar(1 / w_global, layout)
                t[f"{name}.input_global_scale"] = _scalar(1 / a_scale, layout)
        else:  # FP8: per-module weight scales, as Model Optimizer writes them
            t[f"{name}.weight"] = (rand(o, i) - 0.5).to(torch.float8_e4m3fn)
            t[f"{name}.weight_scale"] = _scalar(1e-4 + rand(1).item() * 1e-4, layout)
            t[f"{name}.input_scale"] = _scalar(a_scale, layout)
    for layer in (L0, L1):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            t[f"{layer}.{norm}.weight"] = torch.ones(H, dtype=torch.bfloat16)
        if kv:
            for x in "kv":
                where = f"{layer}.self_attn.{x}_proj" if layout == "modelopt" else f"{layer}.self_attn"
                t[f"{where}.{x}_scale"] = _scalar(0.01 + rand(1).item(), layout)
    t[f"{L1}.mlp.gate.weight"] = rand(N_EXPERTS, H).to(torch.bfloat16)  # MoE router, excluded
    t["model.embed_tokens.weight"] = rand(VOCAB, H).to(torch.bfloat16)
    t["model.norm.weight"] = torch.ones(H, dtype=torch.bfloat16)
    t["lm_head.weight"] = rand(VOCAB, H).to(torch.bfloat16)
    return t


EXCLUDE = ["lm_head", "model.embed_tokens", f"{L1}.mlp.gate"]


def build_configs(layout: str, algo: str, kv: bool) -> tuple[dict, dict | None]:
    """(config.json, hf_quant_config.json or None)."""
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": H}
    if layout == "modelopt":
        quant = {
            "quant_algo": algo,
            "kv_cache_quant_algo": "FP8" if kv else None,
            "exclude_modules": list(EXCLUDE),
        }
        if algo == "NVFP4":
            quant["group_size"] = 16
        qc = {"quant_method": "modelopt", "quant_algo": algo, "ignore": list(EXCLUDE)}
        if kv:
            qc["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
        config["quantization_config"] = qc
        return config, {"producer": {"name": "modelopt", "version": "0.47.0"}, "quantization": quant}
    fmt, bits, gs = ("nvfp4-pack-quantized", 4, 16) if algo == "NVFP4" else ("float-quantized", 8, None)
    args = {"num_bits": bits, "type": "float", "symmetric": True, "group_size": gs}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**args, "dynamic": False},
                "input_activations": {**args, "dynamic": "local" if algo == "NVFP4" else False},
                "format": fmt,
            }
        },
        "ignore": list(EXCLUDE),
        "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
        if kv
        else None,
    }
    return config, None


def write_checkpoint(root: Path, tensors: dict, config: dict, hf_quant: dict | None, shards: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    if hf_quant is not None:
        (root / "hf_quant_config.json").write_text(json.dumps(hf_quant))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(root / "model.safetensors"))
        return root
    half = len(names) // 2
    weight_map = {}
    for file, part in zip(SHARDS, (names[:half], names[half:]), strict=True):
        save_file({n: tensors[n] for n in part}, str(root / file))
        weight_map.update({n: file for n in part})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def make(
    tmp_path: Path, layout="modelopt", algo="NVFP4", kv=True, shards=2, edit=None, edit_cfg=None
) -> Path:
    tensors = build_tensors(layout, algo, kv)
    config, hf_quant = build_configs(layout, algo, kv)
    if edit:
        edit(tensors)
    if edit_cfg:
        edit_cfg(config, hf_quant)
    return write_checkpoint(tmp_path / "ckpt", tensors, config, hf_quant, shards)


def only(result: VerifyResult) -> Finding:
    assert len(result.findings) == 1, result.summary(50)
    return result.findings[0]


VALID = [
    ("modelopt", "NVFP4", True, 2),
    ("compressed-tensors", "NVFP4", True, 2),
    ("modelopt", "FP8", False, 2),
    ("compressed-tensors", "FP8", True, 1),
]


@pytest.mark.parametrize(("layout", "algo", "kv", "shards"), VALID)
def test_valid_checkpoint_passes(tmp_path, layout, algo, kv, shards):
    result = verify_checkpoint(make(tmp_path, layout, algo, kv, shards))
    assert result.ok, result.summary(50)
    assert result.findings == []
    assert (result.layout, result.quant_algo) == (layout, algo)
    assert result.n_quantized_modules == len(_linears())
    assert "OK" in result.summary()


def test_compressed_tensors_fp8_dynamic_per_channel_passes(tmp_path):
    """FP8_DYNAMIC: per-channel [out, 1] weight scales in the model dtype, no input scales."""

    def edit(t):
        for name in [k for k in t if k.endswith(".input_scale")]:
            del t[name]
        for name in [k for k in t if k.endswith(".weight_scale")]:
            out = t[name.replace("weight_scale", "weight")].shape[0]
            t[name] = torch.full((out, 1), 1e-3, dtype=torch.bfloat16)

    def edit_cfg(config, hf_quant):
        group = config["quantization_config"]["config_groups"]["group_0"]
        group["input_activations"].update(dynamic=True, strategy="token")
        group["weights"]["strategy"] = "channel"

    root = make(tmp_path, layout="compressed-tensors", algo="FP8", kv=False, edit=edit, edit_cfg=edit_cfg)
    result = verify_checkpoint(root)
    assert result.ok, result.summary(50)


def _set(name, value):
    def edit(t):
        t[name] = value

    return edit


def _drop(name):
    return lambda t: t.pop(name)


@pytest.mark.parametrize("value", [math.nan, 0.0, -1.0, math.inf])
def test_bad_input_scale_value(tmp_path, value):
    f = only(verify_checkpoint(make(tmp_path, edit=_set(f"{EXPERT}.input_scale", torch.tensor(value)))))
    assert f.tensor == f"{EXPERT}.input_scale" and "finite and > 0" in f.problem


@pytest.mark.parametrize("value", [0.0, math.nan])
def test_bad_block_scale(tmp_path, value):
    def edit(t):
        s = t[f"{EXPERT}.weight_scale"].float()
        s[3, 1] = value
        t[f"{EXPERT}.weight_scale"] = s.to(torch.float8_e4m3fn)

    f = only(verify_checkpoint(make(tmp_path, edit=edit)))
    assert f.tensor == f"{EXPERT}.weight_scale"
    assert f.problem.startswith(f"1 of {H * I_MOE // 16} scales") and "[3, 1]" in f.problem


@pytest.mark.parametrize(
    ("layout", "tensor", "edit", "problem"),
    [
        ("modelopt", f"{EXPERT}.input_scale", _drop(f"{EXPERT}.input_scale"), "missing"),
        ("modelopt", f"{EXPERT}.weight_scale_2", _drop(f"{EXPERT}.weight_scale_2"), "missing"),
        (
            "compressed-tensors",
            f"{EXPERT}.input_global_scale",
            _drop(f"{EXPERT}.input_global_scale"),
            "missing",
        ),
        (
            "modelopt",
            f"{EXPERT}.input_scale",
            _set(f"{EXPERT}.input_scale", torch.tensor(1e-3, dtype=torch.bfloat16)),
            "dtype bfloat16, expected float32",
        ),
        (
            "modelopt",
            f"{EXPERT}.weight_scale",
            _set(f"{EXPERT}.weight_scale", torch.ones(H, I_MOE // 16)),
            "dtype float32, expected float8_e4m3fn",
        ),
        (
            "modelopt",
            f"{EXPERT}.weight",
            _set(f"{EXPERT}.weight", torch.zeros(H, I_MOE, dtype=torch.bfloat16)),
            "dtype bfloat16, expected uint8",
        ),
        (
            "modelopt",
            f"{EXPERT}.weight_scale",
            _set(f"{EXPERT}.weight_scale", torch.ones(H, I_MOE // 32).to(torch.float8_e4m3fn)),
            "expected [64, 2]",
        ),
        (
            "modelopt",
            f"{EXPERT}.weight_scale_2",
            _set(f"{EXPERT}.weight_scale_2", torch.ones(2) * 1e-4),
            "expected one element",
        ),
        (
            "compressed-tensors",
            f"{EXPERT}.weight",
            _set(f"{EXPERT}.weight", torch.zeros(H, I_MOE // 2, dtype=torch.uint8)),
            "not a tensor of a compressed-tensors NVFP4",
        ),
    ],
)
def test_module_defect_is_named(tmp_path, layout, tensor, edit, problem):
    f = only(verify_checkpoint(make(tmp_path, layout=layout, edit=edit)))
    assert f.tensor == tensor and problem in f.problem, f


def test_fp8_missing_input_scale_and_wrong_weight_dtype(tmp_path):
    def edit(t):
        t.pop(f"{L0}.mlp.down_proj.input_scale")
        t[f"{L0}.self_attn.o_proj.weight"] = torch.zeros(H, H, dtype=torch.bfloat16)

    result = verify_checkpoint(make(tmp_path, algo="FP8", kv=False, edit=edit))
    assert {str(f) for f in result.findings} == {
        f"{L0}.mlp.down_proj.input_scale: missing; the module is quantized (has weight, weight_scale)",
        f"{L0}.self_attn.o_proj.weight: dtype bfloat16, expected float8_e4m3fn",
    }


@pytest.mark.parametrize(
    ("layout", "scale"), [("modelopt", "weight_scale_2"), ("compressed-tensors", "weight_global_scale")]
)
def test_fused_gate_up_must_share_global_scale(tmp_path, layout, scale):
    name = f"{L1}.mlp.experts.1.up_proj.{scale}"
    f = only(verify_checkpoint(make(tmp_path, layout=layout, edit=lambda t: t[name].mul_(1.5))))
    assert f.tensor == f"{L1}.mlp.experts.1.{{gate_proj,up_proj}}"
    assert f"must share {scale}" in f.problem and "gate_proj=" in f.problem and "up_proj=" in f.problem


@pytest.mark.parametrize("algo", ["NVFP4", "FP8"])
def test_qkv_must_share_input_scale(tmp_path, algo):
    name = f"{L0}.self_attn.k_proj.input_scale"
    f = only(verify_checkpoint(make(tmp_path, algo=algo, kv=False, edit=lambda t: t[name].mul_(2))))
    assert f.tensor == f"{L0}.self_attn.{{q_proj,k_proj,v_proj}}" and "must share input_scale" in f.problem


def test_quant_algo_missing(tmp_path):
    def edit_cfg(config, hf_quant):
        del hf_quant["quantization"]["quant_algo"], config["quantization_config"]["quant_algo"]

    f = only(verify_checkpoint(make(tmp_path, edit_cfg=edit_cfg)))
    assert "quant_algo" in f.tensor and "quant_algo missing" in f.problem


@pytest.mark.parametrize(
    ("layout", "edit_cfg", "problem"),
    [
        ("modelopt", lambda c, q: q["quantization"].update(group_size=32), "group_size 32"),
        (
            "modelopt",
            lambda c, q: c["quantization_config"].update(quant_algo="FP8"),
            "hf_quant_config.json says 'NVFP4'",
        ),
        (
            "compressed-tensors",
            lambda c, q: c["quantization_config"].update(quantization_status="frozen"),
            "'frozen'",
        ),
        (
            "compressed-tensors",
            lambda c, q: c["quantization_config"].update(format="pack-quantized"),
            "unknown",
        ),
    ],
)
def test_config_defects(tmp_path, layout, edit_cfg, problem):
    result = verify_checkpoint(make(tmp_path, layout=layout, edit_cfg=edit_cfg))
    assert any(problem in f.problem for f in result.findings), result.summary(50)


def test_excluded_module_carrying_quantized_tensors(tmp_path):
    o_proj = f"{L0}.self_attn.o_proj"

    def edit_cfg(config, hf_quant):
        hf_quant["quantization"]["exclude_modules"].append("model.layers.0.self_attn.o_*")
        config["quantization_config"]["ignore"] = hf_quant["quantization"]["exclude_modules"]

    f = only(verify_checkpoint(make(tmp_path, edit_cfg=edit_cfg)))
    assert f.tensor == o_proj and "exclude_modules entry 'model.layers.0.self_attn.o_*'" in f.problem


@pytest.mark.parametrize("layout", ["modelopt", "compressed-tensors"])
def test_unquantized_projection_not_excluded(tmp_path, layout):
    name = f"{L1}.mlp.experts.0.down_proj"

    def edit(t):
        for key in [k for k in t if k.startswith(f"{name}.")]:
            del t[key]
        t[f"{name}.weight"] = torch.zeros(H, I_MOE, dtype=torch.bfloat16)

    f = only(verify_checkpoint(make(tmp_path, layout=layout, edit=edit)))
    assert f.tensor == f"{name}.weight" and "unquantized (bfloat16) and not in the" in f.problem


def test_half_quantized_fused_group(tmp_path):
    def edit(t):
        for key in [k for k in t if k.startswith(f"{L0}.mlp.up_proj.")]:
            del t[key]
        t[f"{L0}.mlp.up_proj.weight"] = torch.zeros(INTER, H, dtype=torch.bfloat16)

    def edit_cfg(config, hf_quant):
        hf_quant["quantization"]["exclude_modules"].append(f"{L0}.mlp.up_proj")
        config["quantization_config"]["ignore"] = hf_quant["quantization"]["exclude_modules"]

    f = only(verify_checkpoint(make(tmp_path, edit=edit, edit_cfg=edit_cfg)))
    assert (
        f.tensor == f"{L0}.mlp.{{gate_proj,up_proj}}"
        and "mix quantized (gate_proj) and unquantized (up_proj)" in f.problem
    )


def _edit_index(root: Path, fn) -> None:
    path = root / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    fn(index["weight_map"])
    path.write_text(json.dumps(index))


def test_index_names_missing_file(tmp_path):
    root = make(tmp_path)
    _edit_index(root, lambda m: m.update({"lm_head.weight": "model-00003-of-00003.safetensors"}))
    result = verify_checkpoint(root)
    assert (
        Finding(
            "model-00003-of-00003.safetensors",
            "listed in model.safetensors.index.json for 1 tensors but missing",
        )
        in result.findings
    )
    assert any(
        f.tensor == "lm_head.weight" and "places it in model-00003" in f.problem for f in result.findings
    )


def test_index_names_tensor_not_in_its_file(tmp_path):
    root = make(tmp_path)
    _edit_index(root, lambda m: m.update({f"{EXPERT}.extra": SHARDS[0]}))
    f = only(verify_checkpoint(root))
    assert (
        f.tensor == f"{EXPERT}.extra" and f"places it in {SHARDS[0]}, which does not contain it" in f.problem
    )


def test_truncated_shard_is_named(tmp_path):
    root = make(tmp_path)
    data = (root / SHARDS[1]).read_bytes()
    (root / SHARDS[1]).write_bytes(data[:-100])
    result = verify_checkpoint(root)
    assert any(f.tensor == SHARDS[1] and "unreadable" in f.problem for f in result.findings)


@pytest.mark.parametrize(
    ("layout", "name"),
    [("modelopt", f"{L1}.self_attn.v_proj.v_scale"), ("compressed-tensors", f"{L1}.self_attn.v_scale")],
)
def test_kv_scale_missing(tmp_path, layout, name):
    f = only(verify_checkpoint(make(tmp_path, layout=layout, edit=_drop(name))))
    assert f == Finding(name, "missing; kv_cache_quant_algo is FP8")


def test_kv_scale_bad_value(tmp_path):
    name = f"{L0}.self_attn.k_proj.k_scale"
    f = only(verify_checkpoint(make(tmp_path, edit=_set(name, torch.tensor(math.nan)))))
    assert f.tensor == name and "finite and > 0" in f.problem


def test_summary_lists_first_findings_and_counts_the_rest(tmp_path):
    def edit(t):
        for name in [k for k in t if k.endswith(".input_scale")]:
            del t[name]

    result = verify_checkpoint(make(tmp_path, edit=edit))
    assert len(result.findings) == len(_linears()) and not result.ok
    text = result.summary(max_findings=3)
    assert f"FAILED ({len(_linears())} findings)" in text and f"... and {len(_linears()) - 3} more" in text
    assert text.count(".input_scale: missing") == 3


def test_unusable_directories_raise(tmp_path):
    with pytest.raises(QuantshipError, match="no such checkpoint directory"):
        verify_checkpoint(tmp_path / "nope")
    with pytest.raises(QuantshipError, match="no config.json"):
        verify_checkpoint(tmp_path)
    tensors = {"lm_head.weight": torch.zeros(4, 4, dtype=torch.bfloat16)}
    root = write_checkpoint(tmp_path / "plain", tensors, {"model_type": "llama"}, None, shards=1)
    with pytest.raises(QuantshipError, match="no quantization config"):
        verify_checkpoint(root)
