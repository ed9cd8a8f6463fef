"""A corpus of broken model folders for `quantship quantize`: each one is a one-line error naming
the problem, exit code 2, nothing written — never a traceback, never a checkpoint quantized from
weights transformers silently made up.

Generated here from one tiny Llama (saved with `save_pretrained`, SmolLM2's tokenizer): truncated
or garbled safetensors, wrong dtypes, shards missing from the index, config and weights that
disagree, NaN/inf weights, broken configs and tokenizers.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from quantship.cli import main

from tiny_models import save_tiny_model

WEIGHTS = "model.safetensors"
UP = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory, smollm2_dir) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("base") / "model", tokenizer_dir=smollm2_dir)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "calib.txt"
    p.write_text("\n\n".join(f"Paragraph {i}: some plain words to calibrate on. " * 4 for i in range(8)))
    return p


# --------------------------------------------------------------------------- edits


def tensors(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        t = load_file(d / WEIGHTS)
        fn(t)
        save_file(t, d / WEIGHTS, metadata={"format": "pt"})
    return apply


def setitem(name: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    def edit(t):
        t[name] = fn(t[name])
    return tensors(edit)


def poison(name: str, value: float):
    def fn(w):
        w = w.clone()
        w.view(-1)[7] = value
        return w
    return setitem(name, fn)


def raw(fn: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / WEIGHTS).write_bytes(fn((d / WEIGHTS).read_bytes()))
    return apply


def config(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        c = json.loads((d / "config.json").read_text())
        fn(c)
        (d / "config.json").write_text(json.dumps(c))
    return apply


def sharded(fn: Callable[[dict[str, str]], object] | None = None, drop_file: bool = False) -> Callable[[Path], None]:
    """Split the weights into two shards with an index, then let `fn` edit the weight map."""
    def apply(d: Path) -> None:
        t = load_file(d / WEIGHTS)
        (d / WEIGHTS).unlink()
        names = sorted(t)
        files = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
        weight_map = {}
        for f, part in zip(files, (names[: len(names) // 2], names[len(names) // 2:]), strict=True):
            save_file({n: t[n] for n in part}, d / f, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, f))
        index = {"metadata": {}, "weight_map": weight_map}
        if fn is not None:
            index = fn(weight_map) or index
        (d / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
        if drop_file:
            (d / files[1]).unlink()
    return apply


def header_garbage(b: bytes) -> bytes:
    n = int.from_bytes(b[:8], "little")
    return b[:8] + b"{" * n + b[8 + n:]


def leave_out_second_shard(weight_map: dict[str, str]) -> None:
    for name in [k for k, f in weight_map.items() if f.startswith("model-00002")]:
        del weight_map[name]


def rm(*names: str) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        for n in names:
            (d / n).unlink()
    return apply


# (id, edit, a substring of the one error line)
BROKEN = [
    # truncated or garbled safetensors
    ("truncated-weights", raw(lambda b: b[: len(b) // 2]), "check that the checkpoint is complete"),
    ("truncated-header", raw(lambda b: b[:6]), "header too small"),
    ("empty-weights-file", raw(lambda b: b""), "header too small"),
    ("header-length-too-large", raw(lambda b: (2**40).to_bytes(8, "little") + b[8:]), "header too large"),
    ("header-not-json", raw(header_garbage), "invalid JSON in header"),
    ("no-weights-file", rm(WEIGHTS), "no file named model.safetensors"),
    ("weights-file-is-a-directory", lambda d: (rm(WEIGHTS)(d), (d / WEIGHTS).mkdir()), "no file named model.safetensors"),
    # wrong dtypes
    ("int32-weight", setitem(UP, lambda w: (w * 100).to(torch.int32)), f"{UP} is stored as int32"),
    ("uint8-weight", setitem(UP, lambda w: torch.zeros_like(w, dtype=torch.uint8)), f"{UP} is stored as uint8"),
    ("bool-weight", setitem("model.norm.weight", lambda w: w > 0), "model.norm.weight is stored as bool"),
    ("fp8-weight-without-quantization-config", setitem(UP, lambda w: w.to(torch.float8_e4m3fn)),
     f"{UP} is stored as float8_e4m3fn"),
    # shards missing from the index, broken indexes
    ("shard-file-missing", sharded(drop_file=True), "No such file or directory"),
    ("shard-left-out-of-index", sharded(leave_out_second_shard), "missing from its checkpoint"),
    ("index-not-json", sharded(lambda m: "{oops"), "cannot load model"),
    ("index-without-weight-map", sharded(lambda m: {"metadata": {}}), "weight_map"),
    ("index-weight-map-a-list", sharded(lambda m: {"weight_map": list(m)}), "cannot load the weights"),
    # config and weights that disagree
    ("tensor-missing", tensors(lambda t: t.pop("model.layers.1.mlp.down_proj.weight")),
     "(model.layers.1.mlp.down_proj.weight); config.json and the weights disagree"),
    ("config-wants-more-layers", config(lambda c: c.update(num_hidden_layers=3)), "9 weights of the model"),
    ("hidden-size-disagrees", config(lambda c: c.update(hidden_size=96)), "ignore_mismatched_sizes"),
    ("vocab-size-disagrees", config(lambda c: c.update(vocab_size=1000)), "ignore_mismatched_sizes"),
    ("tensor-of-wrong-shape", setitem("model.layers.0.self_attn.q_proj.weight", lambda w: w[:, :32].contiguous()),
     "ignore_mismatched_sizes"),
    # NaN / inf weights
    ("nan-weight", poison(UP, float("nan")), f"{UP} contains NaN or inf"),
    ("inf-embedding", poison("model.embed_tokens.weight", float("inf")), "model.embed_tokens.weight contains NaN"),
    ("nan-norm", poison("model.layers.0.input_layernorm.weight", float("nan")), "input_layernorm.weight contains NaN"),
    # broken configs
    ("config-not-json", lambda d: (d / "config.json").write_text("{oops"), "is not readable JSON"),
    ("config-an-array", lambda d: (d / "config.json").write_text("[]"), "holds an array, not a JSON object"),
    ("config-without-model-type", config(lambda c: c.pop("model_type")), "model_type"),
    ("config-unknown-model-type", config(lambda c: c.update(model_type="no_such_arch")), "unsupported model"),
    ("config-field-of-wrong-type", config(lambda c: c.update(hidden_size="sixty-four")), "hidden_size"),
    ("config-zero-heads", config(lambda c: c.update(num_attention_heads=0)), "ZeroDivisionError"),
    ("config-heads-do-not-divide", config(lambda c: c.update(num_attention_heads=5)), "validate_architecture"),
    ("config-unsupported-architecture", config(lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])),
     "missing from its checkpoint"),
    # tokenizer
    ("tokenizer-missing", rm("tokenizer.json", "tokenizer_config.json"), "cannot load the tokenizer"),
    ("tokenizer-corrupt", lambda d: (d / "tokenizer.json").write_text("{"), "cannot load the tokenizer"),
    ("config-dtype-unknown", config(lambda c: c.update(dtype="float13")), "float13"),
]


def _quantize(capsys, model: Path, text_file: Path, export: Path) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["quantize", "--model", str(model), "--dataset", str(text_file), "--export", str(export),
                 "--calib-size", "1", "--calib-seq-len", "16", "--no-progress"])
    return code, capsys.readouterr().err


def _check_one_line(code: int, err: str, expected: str, export: Path) -> None:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]  # transformers' load report aside
    assert code == 2 and len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert not export.exists() and not list(export.parent.glob(".quantship-tmp-*"))


def test_the_corpus_is_large():
    assert len(BROKEN) >= 30 and len({b[0] for b in BROKEN}) == len(BROKEN)


@pytest.mark.parametrize(("case", "edit", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_model_is_one_line_exit_2(base, text_file, tmp_path, capsys, case, edit, expected):
    model = tmp_path / case
    shutil.copytree(base, model)
    edit(model)
    code, err = _quantize(capsys, model, text_file, tmp_path / "out")
    _check_one_line(code, err, expected, tmp_path / "out")


def test_a_dimension_nvfp4_cannot_block(base, text_file, tmp_path, capsys):
    """hidden_size 72: the linears' inputs are not a multiple of NVFP4's block of 16."""
    cfg = LlamaConfig(vocab_size=json.loads((base / "config.json").read_text())["vocab_size"], hidden_size=72,
                      intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=18, max_position_embeddings=64, tie_word_embeddings=False)
    model = tmp_path / "hidden72"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(model)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (base / f).is_file():
            shutil.copy2(base / f, model / f)
    code, err = _quantize(capsys, model, text_file, tmp_path / "out")
    _check_one_line(code, err, "input dimension 72, not divisible by 16", tmp_path / "out")
