"""--algorithm gptq end to end: exports that verify and reload to the in-memory fake-quant
model, GPTQ's own codes in the checkpoint, and MoE experts with too few routed tokens kept at
round-to-nearest and listed in the report."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from quantship.algorithms.gptq import GPTQConfig
from quantship.cli import main
from quantship.formats import nvfp4
from quantship.pipeline import quantize
from quantship.verify import verify_checkpoint
from test_quantize_dense import assert_reload_reproduces_fake_quant

from tiny_models import build_tiny_model, save_tiny_model


def _batches(n: int = 2, rows: int = 4, seq: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 256, (rows, seq), generator=g)} for _ in range(n)]


@pytest.mark.parametrize(("qformat", "mode"), [("nvfp4", "static"), ("nvfp4", "dynamic"), ("fp8", "static")])
def test_export_verifies_reloads_and_holds_gptqs_codes(qformat, mode, tmp_path):
    model = build_tiny_model("qwen3")
    config = GPTQConfig(nvfp4_scales=mode)
    qm = quantize(model, qformat, _batches(), kv_cache="fp8", progress=False, algorithm="gptq", gptq_config=config)
    rtn = quantize(build_tiny_model("qwen3"), qformat, _batches(), progress=False)
    out = qm.export(tmp_path / "out", progress=False)
    assert verify_checkpoint(out).ok
    assert_reload_reproduces_fake_quant(qm, out, _batches(1, 2, 9)[0]["input_ids"])
    saved = load_file(str(out / "model.safetensors"))
    report = json.loads((out / "gptq.json").read_text())
    assert report["options"]["nvfp4_scales"] == mode
    assert all(v["method"] == "gptq" for v in report["targets"].values()), "512 tokens >= 2 x 128 inputs"
    changed = 0
    for t in qm.plan.targets:
        chosen, plain = t.scales["weight"], rtn.plan.handler.quantize(t.weight, rtn.plan.target(t.key).scales)["weight"]
        # The checkpoint holds exactly the codes GPTQ chose (not a requantization of anything).
        assert torch.equal(saved[f"{t.key}.weight"].view(torch.uint8), chosen.view(torch.uint8))
        changed += not torch.equal(chosen.view(torch.uint8), plain.view(torch.uint8))
        if qformat == "nvfp4":
            assert torch.equal(saved[f"{t.key}.weight_scale_2"], rtn.plan.target(t.key).scales["weight_scale_2"])
            if mode == "static":  # block scales fixed from the original weight: RTN's
                assert torch.equal(saved[f"{t.key}.weight_scale"].view(torch.uint8),
                                   nvfp4.quantize_nvfp4(t.weight, t.scales["weight_scale_2"]).block_scale.view(torch.uint8))
    assert changed == len(qm.plan.targets)
    # GPTQ leaves the model's own weights untouched.
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 build_tiny_model("qwen3").state_dict().values(), strict=True))


def test_gptq_lowers_the_layer_output_error_of_every_weight(tmp_path):
    qm = quantize(build_tiny_model("llama"), "nvfp4", _batches(), progress=False, algorithm="gptq")
    ratios = [v["error_ratio_vs_rtn"] for v in qm.plan.algorithm_report["targets"].values()]
    assert len(ratios) == 14 and max(ratios) < 1.0


def test_moe_experts_with_few_routed_tokens_keep_round_to_nearest(tmp_path):
    """Fused Qwen3-MoE experts (32, top-2): per-expert Hessians from routed tokens only. With
    act_quant off, layer 0 routes exactly as in calibration, so its token counts must equal the
    calibration coverage, and the experts below the threshold must hold RTN's bytes."""
    config = GPTQConfig(min_tokens_per_dim=0.5, act_quant=False)  # gate_up: 32 tokens, down: 16
    batches = _batches(2, 2, 64)
    qm = quantize(build_tiny_model("qwen3_moe"), "nvfp4", batches, progress=False, algorithm="gptq",
                  gptq_config=config)
    rtn = quantize(build_tiny_model("qwen3_moe"), "nvfp4", batches, progress=False)
    out = qm.export(tmp_path / "out", progress=False)
    assert verify_checkpoint(out).ok
    report = json.loads((out / "gptq.json").read_text())
    coverage = json.loads((out / "coverage.json").read_text())
    saved = load_file(str(out / "model.safetensors"))
    plain = load_file(str(rtn.export(tmp_path / "rtn", progress=False) / "model.safetensors"))
    md = (out / "report.md").read_text()
    for key, need in (("model.layers.0.mlp.experts.gate_up_proj", 32), ("model.layers.0.mlp.experts.down_proj", 16)):
        entry = report["targets"][key]
        assert entry["tokens_per_expert"] == coverage["blocks"]["model.layers.0.mlp"]["tokens_per_expert"]
        low = [e for e, n in enumerate(entry["tokens_per_expert"]) if n < need]
        assert entry["rtn_experts"] == low and 0 < len(low) < 32, "the test needs both kinds of expert"
        assert f"| `{key}` | 32 | {32 - len(low)} | {', '.join(map(str, low))} |" in md
        leaf = "gate_proj" if "gate_up" in key else "down_proj"
        differs = []
        for e in range(32):
            name = f"model.layers.0.mlp.experts.{e}.{leaf}.weight"
            differs.append(not torch.equal(saved[name], plain[name]))
        assert not any(differs[e] for e in low)
        assert all(differs[e] for e in range(32) if e not in low)


def test_cli_algorithm_flag(tmp_path, smollm2_dir, capsys):
    src = save_tiny_model("llama", tmp_path / "model", tokenizer_dir=smollm2_dir)
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog. " * 8 for i in range(30)))
    out = tmp_path / "export"
    code = main(["quantize", "--model", str(src), "--qformat", "nvfp4", "--algorithm", "gptq", "--calib-size", "8",
                 "--calib-seq-len", "64", "--dataset", str(text), "--export", str(out), "--no-progress"])
    assert code == 0 and (out / "gptq.json").is_file()
    assert "## Weight algorithm: GPTQ" in (out / "report.md").read_text()
    assert main(["verify", str(out)]) == 0
    capsys.readouterr()
    assert main(["quantize", "--model", str(src), "--algorithm", "awq2", "--export", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--algorithm" in err[0] and "gptq" in err[0]
    # --streaming runs GPTQ layer by layer and writes the in-memory path's checkpoint bytes.
    streamed = tmp_path / "streamed"
    assert main(["quantize", "--model", str(src), "--qformat", "nvfp4", "--algorithm", "gptq", "--streaming",
                 "--calib-size", "8", "--calib-seq-len", "64", "--dataset", str(text), "--export", str(streamed),
                 "--no-progress"]) == 0
    assert (streamed / "gptq.json").is_file() and main(["verify", str(streamed)]) == 0
    assert (streamed / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_int4_awq_export_holds_gptqs_codes_and_pre_quant_scale(tmp_path):
    """INT4 W4A16 AWQ: GPTQ runs on the AWQ-smoothed weights (their inputs scaled by the
    pre_quant_scale hooks), and the export keeps both GPTQ's packed codes and the scales."""
    from test_more_formats_export import _llama

    qm = quantize(_llama(), "int4_awq", _batches(), progress=False, algorithm="gptq")
    out = qm.export(tmp_path / "out", progress=False)
    assert verify_checkpoint(out).ok
    saved = load_file(str(out / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.pre_quant_scale" in saved
    for t in qm.plan.targets:
        assert torch.equal(saved[f"{t.key}.weight"], t.scales["weight"])
        assert torch.equal(saved[f"{t.key}.weight_scale"], t.scales["weight_scale"])
    assert max(v["error_ratio_vs_rtn"] for v in qm.plan.algorithm_report["targets"].values()) < 1.0


def test_experts_hessians_in_chunks_give_the_same_checkpoint(tmp_path):
    """A Hessian budget below the layer's experts: they are collected a range at a time (one
    calibration pass each), and the checkpoint is the one-pass checkpoint, byte for byte."""
    import json

    from quantship.algorithms.hessian_budget import expert_ranges

    from tiny_models import build_tiny_model

    batches = [{"input_ids": torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(i))}
               for i in range(3)]
    outs, reports = [], []
    for budget in (None, 3 * 4 * (64**2 + 32**2)):  # about 3 of qwen3_moe's tiny experts at a time
        config = GPTQConfig(min_tokens_per_dim=0.25, max_hessian_bytes=budget)
        qm = quantize(build_tiny_model("qwen3_moe"), "nvfp4", batches, moe_min_tokens=4, progress=False,
                      algorithm="gptq", gptq_config=config)
        fused = [t for t in qm.plan.targets if t.fused_experts and t.key.startswith("model.layers.0.")]
        ranges = expert_ranges(fused, config, torch.device("cpu"))
        assert (len(ranges) > 2) == (budget is not None), ranges
        outs.append(qm.export(tmp_path / str(budget), progress=False))
        reports.append(json.loads((outs[-1] / "gptq.json").read_text())["targets"])
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()
    assert reports[0].keys() == reports[1].keys()
    gptq_experts = [len(v["tokens_per_expert"]) - len(v["rtn_experts"]) for v in reports[1].values()
                    if "tokens_per_expert" in v]
    assert gptq_experts and min(gptq_experts) >= 3, gptq_experts  # experts of several ranges ran GPTQ
    for key, a in reports[0].items():
        b = reports[1][key]
        assert {k: v for k, v in a.items() if k != "error_ratio_vs_rtn"} == {k: v for k, v in b.items()
                                                                            if k != "error_ratio_vs_rtn"}
        if a["error_ratio_vs_rtn"] is not None:  # the same sums, added in another order
            assert b["error_ratio_vs_rtn"] == pytest.approx(a["error_ratio_vs_rtn"], rel=1e-5)
