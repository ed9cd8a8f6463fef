"""The rest of hf_ptq's formats end to end: quantize a tiny model, export, `verify` passes, and the
checkpoint has the layout Model Optimizer 0.47 writes for the same model (names, dtypes,
shapes; which modules keep a pre_quant_scale), fused siblings share their scales, MoE experts
(fused 3-D and one Linear per expert) are complete with finite, neutral-where-unreached scales."""

from __future__ import annotations

import copy
import json
import re
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from quantship.cli import main
from quantship.errors import QuantshipError
from quantship.formats import fp8_variants, int8, mxfp
from quantship.load import load_quantized
from quantship.pipeline import quantize
from quantship.recipes import get_recipe
from quantship.verify import verify_checkpoint

from remote_moe.builder import build_remote_moe_model
from remote_moe.configuration_tinymoe import TinyMoeConfig
from tiny_models import build_tiny_model, save_tiny_model

FORMATS = ("fp8_pc_pt", "fp8_pb_wo", "int4_awq", "nvfp4_awq", "w4a8_awq", "w4a8_nvfp4_fp8", "mxfp8", "mxfp4",
           "int8_sq", "int8_wo", "nvfp4_four_over_six")
PQS = "pre_quant_scale"


def _llama(seed: int = 0) -> torch.nn.Module:
    """A dense Llama whose inputs are multiples of 128 (INT4 groups, FP8 tiles) with GQA (k/v
    outputs 64: a partial 128-row FP8 tile) and outlier input channels for the smoothers."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name:
                p.copy_(torch.exp(torch.randn_like(p.float()) * 0.5))  # uneven channels
    return model.eval()


def _batches(n: int = 2, vocab: int = 256) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (2, 16), generator=g)} for _ in range(n)]


def _headers(path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                t = f.get_slice(name)
                out[name] = (t.get_dtype(), tuple(t.get_shape()))
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every format exported once from the same model (shared by the checks below)."""
    root = tmp_path_factory.mktemp("formats")
    done = {}
    for name in FORMATS:
        model = _llama()
        source = {k: v.clone() for k, v in model.state_dict().items()}
        qm = quantize(model, name, _batches(), kv_cache="fp8", progress=False)
        done[name] = (qm.export(root / name, progress=False), qm, source)
    return done


@pytest.mark.parametrize("name", FORMATS)
def test_export_verifies_with_the_declared_algorithm(exports, name):
    out, qm, _ = exports[name]
    result = verify_checkpoint(out)
    assert result.ok, result.summary(20)
    recipe = get_recipe(name)
    assert (result.layout, result.quant_algo) == ("modelopt", recipe.quant_algo)
    assert result.n_quantized_modules == 7 * 2
    q = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert q.get("group_size") == recipe.group_size and q["kv_cache_quant_algo"] == "FP8"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_algo"] == recipe.quant_algo
    assert "lm_head" in q["exclude_modules"]


@pytest.mark.parametrize("name", ["int4_awq", "w4a8_awq", "nvfp4_awq", "w4a8_nvfp4_fp8", "int8_sq"])
def test_fused_siblings_share_their_scales(exports, name):
    out, _, _ = exports[name]
    t = load_file(str(out / "model.safetensors"))
    for layer in range(2):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            parent = f"model.layers.{layer}.{'self_attn' if 'q_proj' in group else 'mlp'}"
            for leaf in ("weight_scale_2", "input_scale", PQS):
                values = [t.get(f"{parent}.{m}.{leaf}") for m in group]
                if values[0] is not None:
                    assert all(torch.equal(v, values[0]) for v in values), (parent, leaf)


def test_awq_folds_into_norms_where_model_optimizer_does(exports):
    # Model Optimizer's INT4_AWQ export of a Llama: q/k/v and gate/up scales go into the norms,
    # o_proj and down_proj keep theirs (export/quant_utils.py fuse_prequant_layernorm).
    for name in ("int4_awq", "w4a8_awq", "nvfp4_awq"):
        out, qm, source = exports[name]
        t = load_file(str(out / "model.safetensors"))
        kept = sorted(k.removesuffix(f".{PQS}") for k in t if k.endswith(PQS))
        assert kept == [f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp.down_proj", "self_attn.o_proj")]
        for i in range(2):
            for norm in ("input_layernorm", "post_attention_layernorm"):
                key = f"model.layers.{i}.{norm}.weight"
                assert not torch.equal(t[key], source[key])  # the group's scale is folded in
        assert all(torch.isfinite(t[k].float()).all() and (t[k] > 0).all() for k in t if k.endswith(PQS))
    out, _, _ = exports["int8_sq"]  # SmoothQuant: every module keeps its scale, norms untouched
    t = load_file(str(out / "model.safetensors"))
    assert sum(k.endswith(PQS) for k in t) == 14


def test_smoothed_model_still_computes_the_same_function():
    model = _llama()
    ids = _batches(1)[0]["input_ids"]
    with torch.no_grad():
        before = model(ids).logits.float()
    quantize(model, "int4_awq", _batches(), progress=False)
    with torch.no_grad():
        after = model(ids).logits.float()
    # only bf16 rounding of W / s and of the norm weights: far below quantization error
    assert (after - before).abs().max() < 0.1 * before.abs().max()


def test_plain_formats_equal_the_format_functions_on_the_source(exports):
    cases = {
        "fp8_pc_pt": lambda w: fp8_variants.quantize_fp8_per_channel(w),
        "fp8_pb_wo": lambda w: fp8_variants.quantize_fp8_blocks(w),
        "mxfp8": lambda w: mxfp.quantize_mxfp8(w),
        "mxfp4": lambda w: mxfp.quantize_mxfp4(w),
        "int8_wo": lambda w: int8.quantize_int8_per_channel(w),
    }
    for name, fn in cases.items():
        out, _, source = exports[name]
        t = load_file(str(out / "model.safetensors"))
        for m in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
            q, s = fn(source[f"{m}.weight"])
            assert torch.equal(t[f"{m}.weight"].view(torch.uint8), q.view(torch.uint8)), (name, m)
            assert torch.equal(t[f"{m}.weight_scale"], s), (name, m)


def test_layout_equals_model_optimizers_export(exports, tmp_path):
    """Model Optimizer exports the same model with the same presets: the same tensor names, dtypes
    and shapes (its own calibration picks its own values)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.export as export_hf
        import modelopt.torch.quantization as mtq

    for name, cfg_name in (("int4_awq", "INT4_AWQ_CFG"), ("int8_sq", "INT8_SMOOTHQUANT_CFG")):
        model = _llama()
        cfg = copy.deepcopy(getattr(mtq, cfg_name))
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + list(mtq.FP8_KV_CFG["quant_cfg"])
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            mtq.quantize(model, cfg, lambda m: [m(b["input_ids"]) for b in _batches()])
            export_hf.export_hf_checkpoint(model, export_dir=tmp_path / name)
        ours, theirs = _headers(exports[name][0]), _headers(tmp_path / name)
        assert ours == theirs, name
        q_ours = json.loads((exports[name][0] / "hf_quant_config.json").read_text())["quantization"]
        q_theirs = json.loads((tmp_path / name / "hf_quant_config.json").read_text())["quantization"]
        assert {k: v for k, v in q_ours.items() if k != "exclude_modules"} == \
            {k: v for k, v in q_theirs.items() if k != "exclude_modules"}


@pytest.mark.parametrize("name", ["nvfp4_awq", "int8_sq", "w4a8_nvfp4_fp8", "mxfp8"])
def test_fused_3d_experts_export_complete(name, tmp_path):
    model = build_tiny_model("qwen3_moe")
    qm = quantize(model, name, _batches(), progress=False)
    out = qm.export(tmp_path / "out", progress=False)
    result = verify_checkpoint(out)
    assert result.ok, result.summary(20)
    t = load_file(str(out / "model.safetensors"))
    for e in (0, 31):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            m = f"model.layers.1.mlp.experts.{e}.{proj}"
            assert f"{m}.weight" in t and f"{m}.weight_scale" in t
            if get_recipe(name).algorithm:  # AWQ/SQ are not searched inside fused experts: neutral 1
                assert torch.equal(t[f"{m}.{PQS}"], torch.ones_like(t[f"{m}.{PQS}"]))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), qm.fake_quantized() as m:
        expected = m(ids).logits
    with torch.no_grad(), load_quantized(out).fake_quantized() as m:  # per-expert activation scales
        assert torch.equal(m(ids).logits, expected)


@pytest.mark.parametrize("name", ["int8_sq", "nvfp4_awq"])
def test_expert_list_experts_without_tokens_get_neutral_scales(name, tmp_path):
    cfg = TinyMoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, n_routed_experts=32,
                        num_experts_per_tok=2, first_k_dense_replace=1)
    model = build_remote_moe_model(cfg)
    source = {k: v.clone() for k, v in model.state_dict().items()}
    reached = set()
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: reached.add(n) if a[0].numel() else None)
             for n, m in model.named_modules() if re.search(r"\.experts\.\d+$", n)]
    with torch.no_grad():
        model(_batches(1)[0]["input_ids"][:, :4])
    for h in hooks:
        h.remove()
    qm = quantize(model, name, [{"input_ids": _batches(1)[0]["input_ids"][:, :4]}], progress=False)
    out = qm.export(tmp_path / "out", progress=False)
    assert verify_checkpoint(out).ok
    t = load_file(str(out / "model.safetensors"))
    experts = [f"model.layers.1.mlp.experts.{e}" for e in range(32)]
    unreached = [e for e in experts if e not in reached]
    assert unreached and len(unreached) < 32
    scales = {e: t[f"{e}.{p}.{PQS}"] for e in experts for p in ("gate_proj", "down_proj")}
    assert all(torch.isfinite(s.float()).all() and (s > 0).all() for s in scales.values())
    if name == "int8_sq":  # per expert: exactly 1 and the weight untouched where no token came
        for e in unreached:
            assert torch.equal(t[f"{e}.gate_proj.{PQS}"], torch.ones_like(t[f"{e}.gate_proj.{PQS}"]))
            ref = source[f"{e}.gate_proj.weight"]
            q, _ = int8.quantize_int8_per_channel(ref)
            assert torch.equal(t[f"{e}.gate_proj.weight"], q)
    else:  # AWQ averages each projection over the block's experts (Model Optimizer): one scale
        first = t[f"{experts[0]}.down_proj.{PQS}"]
        assert all(torch.equal(t[f"{e}.down_proj.{PQS}"], first) for e in experts)


def test_cli_quantize_verify_with_mse_search(smollm2_dir, tmp_path, capsys):
    src = save_tiny_model("llama", tmp_path / "model", tokenizer_dir=smollm2_dir)
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog. " * 4 for i in range(8)))
    common = ["--calib-size", "2", "--calib-seq-len", "16", "--dataset", str(text), "--no-progress", "--no-streaming"]
    for qformat, search in (("mxfp8", "mse"),):
        out = tmp_path / f"{qformat}-{search}"
        assert main(["quantize", "--model", str(src), "--qformat", qformat, "--weight-scale-search", search,
                     "--export", str(out), *common]) == 0
        assert main(["verify", str(out)]) == 0
    capsys.readouterr()
    assert main(["quantize", "--model", str(src), "--qformat", "int8_sq", "--weight-scale-search", "mse",
                 "--export", str(tmp_path / "x"), *common]) == 2
    assert "needs a block format" in capsys.readouterr().err


def test_int4_split_that_breaks_an_output_pair_is_refused():
    from quantship.formats.handlers_int import pair_rows

    assert torch.equal(pair_rows(torch.arange(4, 10)), torch.arange(2, 5))
    with pytest.raises(QuantshipError, match="unaligned"):
        pair_rows(torch.arange(3, 9))


# Formats whose activations the served model quantizes (statically or per token / MX block).
ACT_QUANT = {"fp8_pc_pt", "nvfp4_awq", "w4a8_awq", "w4a8_nvfp4_fp8", "mxfp8", "mxfp4", "int8_sq", "nvfp4_four_over_six"}


@pytest.mark.parametrize("name", FORMATS)
def test_reload_computes_the_in_memory_fake_quant_logits(exports, name):
    """`load_quantized` (and so `quantship eval`) reloads every format dequantized, with its
    pre_quant_scale and activation fake quant: bit for bit the in-memory fake-quant model."""
    out, qm, _ = exports[name]
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        with qm.fake_quantized() as m:
            expected = m(ids).logits
        loaded = load_quantized(out)
        plain = loaded.model(ids).logits
        with loaded.fake_quantized() as m:
            got = m(ids).logits
    assert torch.equal(got, expected)
    assert torch.equal(got, plain) != (name in ACT_QUANT)  # the activation hooks are live where they should be
    has_pqs = any(k.endswith(PQS) for k in _headers(out))
    assert bool(loaded.pre_quant_scales) == has_pqs


def test_reload_refuses_what_it_cannot_read(exports, tmp_path):
    src, _, _ = exports["int4_awq"]
    for edit, words in ((lambda q: q.update(quant_algo="W4A8_MXFP4"), "'W4A8_MXFP4' cannot be loaded"),
                        (lambda q: q.update(group_size=64), "group_size 64 cannot be loaded")):
        bad = tmp_path / str(len(words))
        shutil.copytree(src, bad)
        hf = json.loads((bad / "hf_quant_config.json").read_text())
        edit(hf["quantization"])
        (bad / "hf_quant_config.json").write_text(json.dumps(hf))
        with pytest.raises(QuantshipError, match=words) as e:
            load_quantized(bad)
        assert "\n" not in str(e.value)
