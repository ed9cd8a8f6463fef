"""Write a tiny remote-code MoE checkpoint folder, laid out like Kimi-K2 / DeepSeek-V3's:
config.json with an `auto_map` into the folder's own python files, a `model_type` that
transformers does not know, per-expert tensor names in model.safetensors, and (optionally) a
real tokenizer copied from another folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .configuration_tinymoe import TinyMoeConfig
from .modeling_tinymoe import MoEGate, TinyMoeForCausalLM

HERE = Path(__file__).parent
REMOTE_FILES = ("configuration_tinymoe.py", "modeling_tinymoe.py")
AUTO_MAP = {
    "AutoConfig": "configuration_tinymoe.TinyMoeConfig",
    "AutoModelForCausalLM": "modeling_tinymoe.TinyMoeForCausalLM",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _tokenizer_vocab_size(tokenizer_dir: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))


def build_remote_moe_model(config: TinyMoeConfig, seed: int = 0) -> TinyMoeForCausalLM:
    """The model with seeded random weights in bfloat16: matrices N(0, 0.08), norms 1, and a
    small random score-correction bias so the routing bias path is exercised."""
    torch.manual_seed(seed)
    model = TinyMoeForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name:
                p.fill_(1.0)
        for module in model.modules():
            if isinstance(module, MoEGate):
                module.e_score_correction_bias.normal_(0.0, 0.01)
    return model.eval()


def save_remote_moe_model(
    path: str | Path,
    seed: int = 0,
    n_experts: int = 48,
    top_k: int = 6,
    hidden: int = 64,
    moe_intermediate: int = 32,
    layers: int = 3,
    first_k_dense: int = 1,
    tokenizer_dir: str | Path | None = None,
    vocab_size: int | None = None,
) -> Path:
    """Write the checkpoint folder; returns `path`.

    `vocab_size` defaults to the size of the tokenizer in `tokenizer_dir` (so any text it
    encodes is valid input), or 256 without one.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if vocab_size is None:
        vocab_size = _tokenizer_vocab_size(Path(tokenizer_dir)) if tokenizer_dir is not None else 256
    config = TinyMoeConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=moe_intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        n_routed_experts=n_experts,
        num_experts_per_tok=top_k,
        first_k_dense_replace=first_k_dense,
        auto_map=dict(AUTO_MAP),
    )
    config.architectures = ["TinyMoeForCausalLM"]
    model = build_remote_moe_model(config, seed)
    model.save_pretrained(path)
    for name in REMOTE_FILES:
        shutil.copy2(HERE / name, path / name)
    saved = json.loads((path / "config.json").read_text())
    if saved.get("model_type") != "tinymoe_remote" or saved.get("auto_map") != AUTO_MAP:
        raise RuntimeError(f"config.json in {path} lacks the remote-code model_type or auto_map: {saved}")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copy2(src, path / name)
    return path
