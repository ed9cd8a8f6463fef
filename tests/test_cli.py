"""The command line: hf_ptq.py aliases work, and every bad input is one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantship.cli import main

from tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_dir) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama") / "model", tokenizer_dir=smollm2_dir)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "calib.txt"
    p.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog. " * 8 for i in range(30)))
    return p


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_hf_ptq_flags_quantize_and_verify(tiny_llama, text_file, tmp_path, capsys):
    out = tmp_path / "export"
    code, stdout, _ = _run(
        capsys, "quantize", "--pyt_ckpt_path", str(tiny_llama), "--qformat", "fp8", "--kv_cache_qformat", "fp8",
        "--calib_size", "3", "--calib_seq_len", "32", "--batch_size", "2", "--dataset", str(text_file),
        "--export_path", str(out), "--no-progress",
    )
    assert code == 0 and "report" in stdout
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["kv_cache_quant_algo"] == "FP8"
    assert (out / "tokenizer.json").is_file() and (out / "report.md").is_file()
    coverage = json.loads((out / "coverage.json").read_text())
    assert coverage["calibration_tokens"] == 3 * 32
    code, stdout, _ = _run(capsys, "verify", str(out))
    assert code == 0 and "OK" in stdout
    # an existing export is refused without --overwrite and replaced with it
    code, _, err = _run(capsys, "quantize", "--model", str(tiny_llama), "--calib-size", "1", "--calib-seq-len", "16",
                        "--dataset", str(text_file), "--export", str(out), "--no-progress")
    assert code == 2 and "--overwrite" in err
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    code, _, _ = _run(capsys, "quantize", "--model", str(tiny_llama), "--calib-size", "1", "--calib-seq-len", "16",
                      "--dataset", str(text_file), "--export", str(out), "--overwrite", "--no-progress")
    assert code == 0
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4"
    assert not list(tmp_path.glob(".quantship-tmp-*"))


def _nan_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_model", "does not exist"),
        ("no_config", "no config.json"),
        ("bad_qformat", "unknown qformat 'nvfp5'"),
        ("bad_kv", "unknown kv cache qformat"),
        ("zero_calib", "--calib-size must be a positive integer"),
        ("empty_dataset", "empty"),
        ("missing_dataset", "cnn_dailymail"),
        ("unwritable_export", "not writable"),
        ("nan_weights", "model.layers.0.mlp.up_proj.weight contains NaN"),
    ],
)
def test_bad_input_is_one_line_exit_2(case, expected, tiny_llama, text_file, tmp_path, capsys):
    args = {"model": str(tiny_llama), "dataset": str(text_file), "export": str(tmp_path / "out"), "qformat": "nvfp4",
            "kv": "none", "calib": "1"}
    if case == "missing_model":
        args["model"] = str(tmp_path / "nope")
    elif case == "no_config":
        (tmp_path / "empty_model").mkdir()
        args["model"] = str(tmp_path / "empty_model")
    elif case == "bad_qformat":
        args["qformat"] = "nvfp5"
    elif case == "bad_kv":
        args["kv"] = "int3"
    elif case == "zero_calib":
        args["calib"] = "0"
    elif case == "empty_dataset":
        (tmp_path / "empty.txt").write_text("")
        args["dataset"] = str(tmp_path / "empty.txt")
    elif case == "missing_dataset":
        args["dataset"] = str(tmp_path / "no_such_file.jsonl")
    elif case == "unwritable_export":
        (tmp_path / "a_file").write_text("x")
        args["export"] = str(tmp_path / "a_file" / "out")
    elif case == "nan_weights":
        args["model"] = str(_nan_model(tiny_llama, tmp_path / "nan_model"))
    code, _, err = _run(
        capsys, "quantize", "--model", args["model"], "--dataset", args["dataset"], "--export", args["export"],
        "--qformat", args["qformat"], "--kv-cache-qformat", args["kv"], "--calib-size", args["calib"],
        "--calib-seq-len", "16", "--no-progress",
    )
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_offline_hub_dataset_names_the_local_alternative(tiny_llama, tmp_path, capsys, monkeypatch):
    import datasets

    def offline(*_a, **_k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    code, _, err = _run(capsys, "quantize", "--model", str(tiny_llama), "--dataset", "cnn_dailymail",
                        "--export", str(tmp_path / "o"), "--calib-size", "1", "--no-progress")
    assert code == 2 and "local" in err and ".txt" in err


def test_console_entry_point_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "quantship.cli", "quantize", "--qformat", "bogus"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown qformat 'bogus'")
    assert "Traceback" not in proc.stderr


def test_verify_of_an_unquantized_dir_is_a_clear_error(tiny_llama, capsys):
    code, _, err = _run(capsys, "verify", str(tiny_llama))
    assert code == 2 and "no quantization config" in err.lower()


def test_python_api_round_trip(tiny_llama, tmp_path):
    import quantship

    model, _ = quantship.load_source_model(str(tiny_llama))
    batches = [{"input_ids": torch.randint(0, 1000, (1, 8))}]
    qm = quantship.quantize(model, "nvfp4", batches, progress=False)
    out = qm.export(tmp_path / "api", progress=False)
    assert quantship.verify_checkpoint(out).ok
