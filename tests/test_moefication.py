"""The MoEfication builder used by bench/accuracy.py: its experts partition the dense FFN exactly,
so with every expert active and equal routing weights the MoE model IS the dense model; and its
export evaluates with a tokens-per-expert heat map."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moefication import balanced_kmeans, build_moefied, moefy_state
from quantship.evaluate import evaluate
from quantship.pipeline import quantize

from tiny_models import build_tiny_model, save_tiny_model


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("dense") / "llama")


def _logits(directory, dtype, ids) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("num_experts", [8, 4])
def test_all_experts_with_equal_weights_reproduce_the_dense_model(dense_dir, tmp_path, num_experts):
    moe = build_moefied(dense_dir, tmp_path / "moe", num_experts=num_experts, top_k=num_experts, zero_router=True)
    config = json.loads((moe / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["shared_expert_intermediate_size"] == 64
    assert config["moe_intermediate_size"] == 64 // num_experts
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    dense32, moe32 = _logits(dense_dir, torch.float32, ids), _logits(moe, torch.float32, ids)
    # float32: only summation order differs (experts summed one by one vs one GEMM)
    assert (dense32 - moe32).abs().max() <= 1e-5 * dense32.abs().max()
    dense16, moe16 = _logits(dense_dir, torch.bfloat16, ids), _logits(moe, torch.bfloat16, ids)
    # bf16: each expert's partial output is rounded to bf16 before the sum (a few bf16 ulps)
    assert (dense16 - moe16).abs().max() <= 2e-2 * dense16.abs().max()
    assert (dense16 - moe16).norm() <= 1e-2 * dense16.norm()  # bf16 ulp: 2**-8 = 4e-3


def test_experts_partition_the_neurons_and_the_router_follows_the_gate_rows():
    dense = build_tiny_model("llama")
    config, state = moefy_state(dense, num_experts=4, top_k=2, shared_fraction=0.5)
    mlp = dense.model.layers[1].mlp
    prefix = "model.layers.1.mlp"
    gate_up = state[f"{prefix}.experts.gate_up_proj"]  # [E, 2 * I_e, H]
    down = state[f"{prefix}.experts.down_proj"]  # [E, H, I_e]
    assert gate_up.shape == (4, 32, 64) and down.shape == (4, 64, 16)
    gates = torch.cat([gate_up[:, :16].reshape(-1, 64), state[f"{prefix}.shared_expert.gate_proj.weight"]])
    assert sorted(tuple(r.tolist()) for r in gates) == sorted(
        tuple(r.tolist()) for r in mlp.gate_proj.weight.detach())  # each neuron exactly once
    # a neuron's gate row, up row and down column travel together (down scaled by E = 4)
    first = mlp.gate_proj.weight.detach().tolist().index(gate_up[2, 5].tolist())
    assert torch.equal(gate_up[2, 16 + 5], mlp.up_proj.weight[first].detach())
    assert torch.equal(down[2, :, 5], mlp.down_proj.weight[:, first].detach() * 4)
    router = state[f"{prefix}.gate.weight"].float()
    mean_gate = gate_up[:, :16].float().mean(1)
    assert torch.nn.functional.cosine_similarity(router, mean_gate, dim=1).min() > 0.99
    assert config.num_experts == 4 and config.num_experts_per_tok == 2 and not config.norm_topk_prob


def test_balanced_kmeans_groups_similar_rows_in_equal_groups():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    rows = torch.cat([c + 0.1 * torch.randn(8, 16, generator=g) for c in centers])
    assign = balanced_kmeans(rows, 4)
    assert torch.bincount(assign, minlength=4).tolist() == [8, 8, 8, 8]
    for k in range(4):  # the planted clusters come back whole
        assert assign[8 * k : 8 * k + 8].unique().numel() == 1


def test_moefied_export_evaluates_with_expert_heatmap(dense_dir, tmp_path, smollm2_dir):
    src = save_tiny_model("llama", tmp_path / "dense", tokenizer_dir=smollm2_dir)
    moe = build_moefied(src, tmp_path / "moe", num_experts=4, top_k=2)  # 16 neurons each: NVFP4 blocks
    model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    qm = quantize(model, "nvfp4_mlp_only", [{"input_ids": ids}], progress=False)
    qm.export(tmp_path / "q", source_dir=moe, progress=False)
    result = evaluate(tmp_path / "q", moe, tmp_path / "eval", eval_size=2, eval_seq_len=16, batch_size=2,
                      layer_batches=1, progress=False)
    assert "expert_tokens_heatmap.png" in result["plots"]
    assert (tmp_path / "eval" / "expert_tokens_heatmap.png").stat().st_size > 1000
    experts = [m for m in result["weight_sqnr_db"] if ".mlp.experts." in m]
    assert len(experts) == 2 * 4 * 3  # layers x experts x (gate, up, down), by checkpoint name
    assert "model.layers.1.mlp.shared_expert.down_proj" in result["weight_sqnr_db"]
