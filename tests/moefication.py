"""MoEfication (Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of
Experts"): a real-weight MoE built from a dense Llama-style model, for accuracy benchmarks.

Not a user feature: a test asset. Each FFN's intermediate neurons are split between a shared
expert and E routed experts; every expert holds exactly the rows of gate/up and the columns of
down of its neurons, so the sum of all experts' outputs IS the dense FFN output. It is written
as a Qwen2-MoE checkpoint (qkv_bias off, so attention, RMSNorm and RoPE are Llama's exactly),
which transformers loads as fused 3-D experts plus a shared-expert MLP.

Choices (documented because they shape what the benchmark measures):
- Shared expert: the `shared_fraction` of neurons with the largest weight-norm product
  |gate_i| |up_i| |down_:,i|. SmolLM2's SiLU FFN is far from ReLU-sparse: routing all neurons
  (as the paper does for ReLU T5) wrecks perplexity whatever the router, so half stay dense.
- Split of the rest: balanced k-means on the L2-normalised gate rows (the paper's "parameter
  clustering split"): neurons whose gate directions agree fire together. Balance is enforced by
  a greedy capacity-bounded assignment (most similar (neuron, centroid) pairs first).
- Router: expert e's row is the mean of its gate rows, so its logit tracks the group's mean gate
  pre-activation: routing follows real activations, and groups that rarely switch on are rarely
  chosen. Rows are scaled down (`router_temperature`) so the softmax weights stay near 1/E.
- Weights: Qwen2-MoE with norm_topk_prob=False weighs a chosen expert by its softmax
  probability over all E (~1/E), and the shared expert by sigmoid(shared_expert_gate(x)); the
  shared gate is zero (exactly 1/2) and the down projections are multiplied by E and by 2 (powers
  of two: exact in bf16), so the block computes the MoEfication sum shared + chosen experts.
With k = E and a zero router every routed weight is exactly 1/E and the model reproduces the
dense one (`tests/test_moefication.py`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "generation_config.json")


def balanced_kmeans(rows: torch.Tensor, groups: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Group index per row, every group exactly len(rows) / groups rows, by cosine similarity."""
    n = rows.shape[0]
    if n % groups:
        raise ValueError(f"{n} neurons do not split into {groups} equal groups")
    cap = n // groups
    x = torch.nn.functional.normalize(rows.double(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=g)[:groups]]
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        sim = x @ centroids.T  # [n, groups]
        order = torch.argsort(sim.reshape(-1), descending=True)
        owner = [-1] * n
        fill = [0] * groups
        for flat in order.tolist():  # greedy: most similar pairs first, each group up to `cap`
            i, c = divmod(flat, groups)
            if owner[i] < 0 and fill[c] < cap:
                owner[i] = c
                fill[c] += 1
        assign = torch.tensor(owner)
        centroids = torch.nn.functional.normalize(
            torch.stack([x[assign == c].mean(0) for c in range(groups)]), dim=1)
    return assign


def moefy_state(dense: torch.nn.Module, num_experts: int, top_k: int, shared_fraction: float = 0.5,
                router_temperature: float = 1e-3, zero_router: bool = False
                ) -> tuple[Qwen2MoeConfig, dict[str, torch.Tensor]]:
    """(Qwen2-MoE config, in-memory state dict) holding `dense`'s FFN neurons as a shared expert
    (the `shared_fraction` most important neurons) plus `num_experts` routed experts."""
    c = dense.config
    if getattr(c, "mlp_bias", False) or getattr(c, "attention_bias", False):
        raise ValueError("MoEfication here needs a Llama-style model without biases")
    n_shared = int(round(c.intermediate_size * shared_fraction / 16)) * 16  # NVFP4 blocks of 16
    inter = (c.intermediate_size - n_shared) // num_experts
    config = Qwen2MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        moe_intermediate_size=inter, shared_expert_intermediate_size=n_shared,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None), qkv_bias=False,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=False, decoder_sparse_step=1,
        mlp_only_layers=[], use_sliding_window=False, router_aux_loss_coef=0.0, architectures=["Qwen2MoeForCausalLM"],
    )
    state: dict[str, torch.Tensor] = {}
    for name, tensor in dense.state_dict().items():
        if ".mlp." not in name:
            state[name] = tensor
    for i, layer in enumerate(dense.model.layers):
        gate, up, down = (layer.mlp.gate_proj.weight.detach(), layer.mlp.up_proj.weight.detach(),
                          layer.mlp.down_proj.weight.detach())
        importance = gate.float().norm(dim=1) * up.float().norm(dim=1) * down.float().norm(dim=0)
        order = torch.argsort(importance, descending=True)
        shared, routed = order[:n_shared].sort().values, order[n_shared:].sort().values
        assign = balanced_kmeans(gate[routed].float(), num_experts, seed=i)
        groups = [routed[assign == e] for e in range(num_experts)]
        prefix = f"model.layers.{i}.mlp"
        state[f"{prefix}.experts.gate_up_proj"] = torch.stack([torch.cat([gate[g], up[g]]) for g in groups])
        # x E: without top-k renormalisation the weights are the softmax over all E experts, ~1/E
        # each (exactly 1/E with a zero router); a power of two keeps the product exact in bf16.
        state[f"{prefix}.experts.down_proj"] = torch.stack([down[:, g] * num_experts for g in groups])
        router = torch.stack([gate[g].float().mean(0) for g in groups])
        router = router / router.norm(dim=1).max() * router_temperature
        state[f"{prefix}.gate.weight"] = torch.zeros_like(router) if zero_router else router
        state[f"{prefix}.shared_expert.gate_proj.weight"] = gate[shared]
        state[f"{prefix}.shared_expert.up_proj.weight"] = up[shared]
        # x 2: the shared expert's gate is sigmoid(0) = 1/2 exactly (zero gate weight)
        state[f"{prefix}.shared_expert.down_proj.weight"] = down[:, shared] * 2
        state[f"{prefix}.shared_expert_gate.weight"] = torch.zeros(1, c.hidden_size)
    return config, {k: v.to(dense.dtype) for k, v in state.items()}


def build_moefied(dense_dir: str | Path, out_dir: str | Path, num_experts: int = 8, top_k: int = 2,
                  shared_fraction: float = 0.5, router_temperature: float = 1e-3, zero_router: bool = False) -> Path:
    """Write the MoEfied Mixtral checkpoint of the dense model in `dense_dir` to `out_dir`."""
    dense_dir, out_dir = Path(dense_dir), Path(out_dir)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16).eval()
    config, state = moefy_state(dense, num_experts, top_k, shared_fraction, router_temperature, zero_router)
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(config)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"MoEfication left parameters unset: {missing[:5]}")
    model.to(torch.bfloat16).save_pretrained(out_dir)
    for name in COPIED_FILES:
        if (dense_dir / name).is_file():
            shutil.copy2(dense_dir / name, out_dir / name)
    meta = {"source": str(dense_dir), "num_experts": num_experts, "top_k": top_k, "shared_fraction": shared_fraction,
            "router_temperature": router_temperature, "zero_router": zero_router,
            "split": "balanced k-means on normalised gate rows", "router": "mean gate row per expert"}
    (out_dir / "moefication.json").write_text(json.dumps(meta, indent=1))
    return out_dir
