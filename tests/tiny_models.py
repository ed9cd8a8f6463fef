"""Tiny seeded models built from real transformers configs and saved with `save_pretrained`,
so tests exercise the same loading path as a real checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    Gemma3TextConfig,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, tie_word_embeddings=False)


def tiny_config(kind: str, vocab: int = VOCAB) -> PretrainedConfig:
    """Configs for every supported architecture, small enough for CPU tests."""
    config = _tiny_config(kind)
    config.vocab_size = vocab
    return config


def _tiny_config(kind: str) -> PretrainedConfig:
    if kind == "llama":
        return LlamaConfig(**COMMON, intermediate_size=128, num_hidden_layers=2)
    if kind == "qwen2":
        return Qwen2Config(**COMMON, intermediate_size=128, num_hidden_layers=2)
    if kind == "qwen3":
        return Qwen3Config(**COMMON, intermediate_size=128, num_hidden_layers=2, head_dim=16)
    if kind == "gemma3":
        return Gemma3TextConfig(**COMMON, intermediate_size=128, num_hidden_layers=2, head_dim=16,
                                sliding_window=32)
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                              num_experts=32, num_experts_per_tok=2, head_dim=16, norm_topk_prob=True)
    if kind == "mixtral":
        return MixtralConfig(**COMMON, intermediate_size=64, num_hidden_layers=2, num_local_experts=8,
                             num_experts_per_tok=2)
    if kind == "deepseek_v3":
        return DeepseekV3Config(
            vocab_size=VOCAB, hidden_size=80, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=64, num_experts_per_tok=8,
            n_shared_experts=1, n_group=8, topk_group=4, num_attention_heads=4, num_key_value_heads=4,
            q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
            max_position_embeddings=256, tie_word_embeddings=False, rope_scaling=None,
        )
    raise ValueError(f"unknown tiny model kind {kind!r}")


ALL_KINDS = ("llama", "qwen2", "qwen3", "gemma3", "qwen3_moe", "mixtral", "deepseek_v3")
MOE_KINDS = ("qwen3_moe", "mixtral", "deepseek_v3")


def model_from_config(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """A bf16 model of `config` with seeded weights: matrices N(0, 0.08), norms 1; other vectors
    (DeepSeek's score-correction bias) keep their init, so routing stays spread."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name:
                p.fill_(1.0)
    return model.eval()


def build_tiny_model(kind: str, seed: int = 0, vocab: int = VOCAB) -> torch.nn.Module:
    return model_from_config(tiny_config(kind, vocab), seed)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_tiny_model(kind: str, path: Path, seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """Save a tiny model; with `tokenizer_dir`, its vocab matches that tokenizer, whose files are
    copied along so the folder is a complete model folder for the CLI."""
    vocab = VOCAB
    if tokenizer_dir is not None:
        vocab = json.loads((Path(tokenizer_dir) / "config.json").read_text())["vocab_size"]
    model = build_tiny_model(kind, seed, vocab)
    model.save_pretrained(path)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, path / name)
    return path


def write_byte_tokenizer(path: Path) -> None:
    """A 256-token byte-level tokenizer (no merges): real tokenizer files for the CLI, ids < 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
