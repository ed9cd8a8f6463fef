"""Fuzz the readers of untrusted files with atheris (coverage-guided, libFuzzer) for a bounded
time, and replay every input that ever crashed one of them.

Targets and input format: tests/verify/fuzz_readers.py. Time: QUANTSHIP_FUZZ_SECONDS (default
15) for all three readers together, in one subprocess, since libFuzzer ends its process itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz_readers import DICTIONARY, Scratch, run_case, seeds

HARNESS = Path(__file__).with_name("fuzz_readers.py")
FUZZ_SECONDS = int(os.environ.get("QUANTSHIP_FUZZ_SECONDS", "15"))


def _verify_config(config: dict, hf_quant: dict | None = None) -> bytes:
    """A "verify_config" input: config.json, then NUL and hf_quant_config.json if given."""
    tail = b"" if hf_quant is None else b"\x00" + json.dumps(hf_quant).encode()
    return b"\x01" + json.dumps(config).encode() + tail


def _modelopt(q: dict, qc: dict | None = None) -> bytes:
    quant = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": ["lm_head"], **q}
    config = {"quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": ["lm_head"], **(qc or {})}
    return _verify_config({"quantization_config": config}, {"quantization": quant})


def _ct(**qc) -> bytes:
    group = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "group_size": 16},
             "input_activations": {"num_bits": 4, "type": "float", "dynamic": "local"}}
    group.update(qc.pop("group", {}))
    config = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
              "quantization_status": "compressed", "config_groups": {"group_0": group}, **qc}
    return _verify_config({"quantization_config": config})


def _header(header: bytes, data: bytes = b"") -> bytes:
    """A "header" input: a safetensors file with this JSON header."""
    return b"\x00" + len(header).to_bytes(8, "little") + header + data


# Inputs that once raised something other than QuantshipError (fixed in verify/config.py,
# verify/checks.py, source.py). The first two were found by this fuzzer within seconds on the
# code before those fixes, the rest by hand while building it.
REGRESSIONS = {
    "fuzz-kv-scheme-type-is-an-object": b'\x01{"model_type#": "llama", "quantization_config": {"quant_method": '
    b'"compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status": "compressed", "ignore": '
    b'["lm_head", "re:.*gate$"], "kv_cache_scheme": {"num_bits": 8, "type": {"targets": ["Linear"], "format": '
    b'"nvfp4-pack-quantized", "weights": {"num_bits": 4, "type": "float", "gro5p_size": 16}, "input_activations": '
    b'{"num_bits": 4, "type": "float", "dynamic": "local"}}}}}',
    "fuzz-group-size-nowhere": b'\x01{"model_type": "llama", "quantization_config": {"quant_method": "modelopt", '
    b'"quant_algo": "NVFP4", "ignore": ["lm_head"], "config_groups": {"group_0": {"weights": {"num_bits": 16}, '
    b'"targets": ["Linear"]}}}}\x00{"producer": {"name": "fuzz"}, "quantization": {"quant_algo": "NVFP4", '
    b'"kv_cache_quant_algo": null, "group_(((((((((size": 16, "exclude_modules": ["lm_head"]}}',
    "quant-algo-a-list": _modelopt({"quant_algo": ["NVFP4"]}),
    "quant-algo-an-object": _modelopt({"quant_algo": {"a": 1}}, {"quant_algo": {"a": 1}}),
    "group-size-a-string": _modelopt({"group_size": "16"}),
    "group-size-zero": _modelopt({"group_size": 0}, {"config_groups": {"g": {"weights": {"group_size": 0}}}}),
    "exclude-modules-numbers": _modelopt({"exclude_modules": [1, 2]}, {"ignore": [1, 2]}),
    "exclude-modules-null-entry": _modelopt({"exclude_modules": [None]}),
    "ignore-nested-list": _modelopt({}, {"ignore": [[1]]}),
    "quantization-section-a-list": _verify_config({"quantization_config": {"quant_method": "modelopt"}},
                                                  {"quantization": [1]}),
    "ct-format-a-list": _ct(format=["x"]),
    "ct-weights-a-list": _ct(group={"weights": [1]}),
    "ct-targets-numbers": _ct(group={"targets": [1]}),
    "ct-ignore-numbers": _ct(ignore=[1]),
    "ct-ignore-bad-regex": _ct(ignore=["re:(("]),
    "ct-kv-bits-a-list": _ct(kv_cache_scheme={"num_bits": [8], "type": "float"}),
    "source-config-an-array": b"\x02[]",
    "source-config-null": b"\x02null",
    "source-quantization-config-a-list": b'\x02{"model_type": "llama", "quantization_config": [1]}',
    "header-empty": b"\x00",
    "header-length-only": b"\x00" + (8).to_bytes(8, "little"),
    "header-huge-length": b"\x00" + (2**63).to_bytes(8, "little") + b"{}",
    "header-offsets-past-the-end": _header(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'),
    "header-bad-dtype": _header(b'{"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}}', b"\x00"),
    "header-negative-shape": _header(b'{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}', b"\x00"),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_inputs_that_once_crashed_a_reader(name, tmp_path):
    run_case(REGRESSIONS[name], Scratch(tmp_path))  # raises if a reader lets anything but QuantshipError out


def test_the_seeds_are_valid_inputs(tmp_path):
    """The seeds are real files that verify accepts: the fuzzer starts from the interesting part."""
    from quantship.verify import verify_checkpoint

    scratch = Scratch(tmp_path)
    for data in seeds():
        run_case(data, scratch)
    header = next(s for s in seeds() if s[0] == 0)
    d = scratch.folder("check", {"config.json": scratch.config.encode(), "hf_quant_config.json": scratch.hf_quant.encode(),
                                 "model.safetensors": header[1:]})
    assert verify_checkpoint(d).ok, verify_checkpoint(d).summary()


def test_fuzz_the_readers_for_a_bounded_time(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for data in [*seeds(), *REGRESSIONS.values()]:
        (corpus / hashlib.sha1(data).hexdigest()).write_bytes(data)
    dictionary = tmp_path / "dict"
    dictionary.write_text("".join(f"kw{i}={json.dumps(token)}\n" for i, token in enumerate(DICTIONARY)))
    pytest.importorskip("atheris", reason="pip install atheris (in the test extra)")
    env = {**os.environ, "QUANTSHIP_FUZZ_SCRATCH": str(tmp_path / "scratch"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(HARNESS), str(corpus), f"-max_total_time={FUZZ_SECONDS}", f"-dict={dictionary}",
         f"-artifact_prefix={tmp_path}/", "-print_final_stats=1", "-rss_limit_mb=4096", "-timeout=30"],
        capture_output=True, text=True, timeout=FUZZ_SECONDS + 120, env=env, cwd=tmp_path,
    )
    crashes = sorted(tmp_path.glob("crash-*")) + sorted(tmp_path.glob("timeout-*")) + sorted(tmp_path.glob("oom-*"))
    found = "\n".join(f"{c.name}: {c.read_bytes()[:300]!r}" for c in crashes)
    # Add each crashing input to REGRESSIONS once its reader is fixed.
    assert proc.returncode == 0 and not crashes, f"{found}\n{proc.stderr[-4000:]}"
    runs = int(re.search(r"number_of_executed_units: (\d+)", proc.stderr).group(1))
    assert runs >= 200, proc.stderr[-2000:]  # it really fuzzed
    print(f"\nfuzzed the readers for {FUZZ_SECONDS} s: {runs} inputs, no crash")
