"""A corpus of broken checkpoints, each a defect a serving engine trips on, planted in a real
export of a tiny model: `quantship verify` names every one (exit 1), or, where there is nothing
to check, says so in one line (exit 2). Never a traceback.

The cases are generated here from three exports (NVFP4 Qwen3-MoE with an FP8 KV cache, sharded;
FP8 Llama; NVFP4 Llama in the compressed-tensors layout), so they stay in step with the writer.
Fuzzing (tests/verify/test_fuzz_readers.py) adds the inputs that once crashed a reader.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantship.cli import main
from quantship.pipeline import quantize

from tiny_models import build_tiny_model

L0, L1 = "model.layers.0", "model.layers.1"
Q, K, V = (f"{L0}.self_attn.{p}_proj" for p in "qkv")
EXPERT = f"{L1}.mlp.experts.5"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    batches = [{"input_ids": torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))}]
    out = {}
    for name, kind, fmt, kv, layout, shard in [
        ("nvfp4", "qwen3_moe", "nvfp4", "fp8", "modelopt", 200_000),
        ("fp8", "llama", "fp8", "none", "modelopt", 5 * 1024**3),
        ("ct", "llama", "nvfp4", "fp8", "compressed-tensors", 5 * 1024**3),
    ]:
        qm = quantize(build_tiny_model(kind), fmt, batches, kv_cache=kv, progress=False)
        out[name] = qm.export(root / name, max_shard_bytes=shard, progress=False, export_format=layout)
    assert len(list(out["nvfp4"].glob("*.safetensors"))) == 2
    return out


# --------------------------------------------------------------------------- editing a checkpoint


def edit_tensors(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    """Apply `fn` to all tensors; each stays in its file, new ones go to the first file."""
    def apply(d: Path) -> None:
        files = sorted(d.glob("*.safetensors"))
        by_file = {f: load_file(f) for f in files}
        tensors = {k: v for t in by_file.values() for k, v in t.items()}
        home = {k: f for f, t in by_file.items() for k in t}
        fn(tensors)
        for f in files:
            save_file({k: v.contiguous() for k, v in tensors.items() if home.get(k, files[0]) == f}, f,
                      metadata={"format": "pt"})
        if (d / INDEX).is_file():
            index = json.loads((d / INDEX).read_text())
            index["weight_map"] = {k: home.get(k, files[0]).name for k in tensors}
            (d / INDEX).write_text(json.dumps(index))
    return apply


def edit_json(file: str, fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        data = json.loads((d / file).read_text())
        fn(data)
        (d / file).write_text(json.dumps(data))
    return apply


def drop(name: str):
    return edit_tensors(lambda t: t.pop(name))


def put(name: str, value: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]):
    def fn(t):
        t[name] = value(t[name]) if callable(value) else value
    return edit_tensors(fn)


def block_byte(byte: int):
    """Set one e4m3 block scale to a raw byte: 0x7F is NaN, 0x00 zero, 0x80|x negative."""
    def fn(w):
        b = w.view(torch.uint8).clone()
        b[1, 0] = byte
        return b.view(torch.float8_e4m3fn)
    return fn


def hq(fn) -> Callable[[Path], None]:
    return edit_json("hf_quant_config.json", lambda j: fn(j["quantization"]))


def qc(fn) -> Callable[[Path], None]:
    return edit_json("config.json", lambda j: fn(j["quantization_config"]))


def both(*edits):
    def apply(d):
        for e in edits:
            e(d)
    return apply


def truncate(d: Path) -> None:
    f = d / "model-00002-of-00002.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


def unlisted(d: Path) -> None:
    index = json.loads((d / INDEX).read_text())
    del index["weight_map"][f"{EXPERT}.up_proj.weight_scale"]
    (d / INDEX).write_text(json.dumps(index))


def listed_elsewhere(d: Path) -> None:
    index = json.loads((d / INDEX).read_text())
    index["weight_map"][f"{Q}.weight_not_there"] = "model-00001-of-00002.safetensors"
    (d / INDEX).write_text(json.dumps(index))


F32 = torch.float32
# (id, base, edit, the finding's tensor (a substring), a substring of its problem)
DEFECTS = [
    # a scale that is missing, NaN, inf, zero or negative
    ("missing-block-scale", "nvfp4", drop(f"{Q}.weight_scale"), f"{Q}.weight_scale", "missing"),
    ("missing-global-scale", "nvfp4", drop(f"{Q}.weight_scale_2"), f"{Q}.weight_scale_2", "missing"),
    ("missing-expert-input-scale", "nvfp4", drop(f"{EXPERT}.down_proj.input_scale"),
     f"{EXPERT}.down_proj.input_scale", "missing"),
    ("nan-input-scale", "nvfp4", put(f"{EXPERT}.up_proj.input_scale", torch.tensor(math.nan)),
     f"{EXPERT}.up_proj.input_scale", "finite and > 0"),
    ("inf-global-scale", "nvfp4", put(f"{K}.weight_scale_2", torch.tensor(math.inf)), f"{K}.weight_scale_2",
     "finite and > 0"),
    ("zero-input-scale", "nvfp4", put(f"{V}.input_scale", torch.tensor(0.0)), f"{V}.input_scale", "finite and > 0"),
    ("negative-input-scale", "nvfp4", put(f"{EXPERT}.gate_proj.input_scale", torch.tensor(-1e-3)),
     f"{EXPERT}.gate_proj.input_scale", "finite and > 0"),
    ("negative-global-scale", "nvfp4", put(f"{L0}.self_attn.o_proj.weight_scale_2", torch.tensor(-1e-4)),
     f"{L0}.self_attn.o_proj.weight_scale_2", "finite and > 0"),
    ("nan-block-scale", "nvfp4", put(f"{EXPERT}.down_proj.weight_scale", block_byte(0x7F)),
     f"{EXPERT}.down_proj.weight_scale", "not finite and > 0"),
    ("zero-block-scale", "nvfp4", put(f"{Q}.weight_scale", block_byte(0x00)), f"{Q}.weight_scale", "not finite and > 0"),
    ("negative-block-scale", "nvfp4", put(f"{Q}.weight_scale", block_byte(0xB8)), f"{Q}.weight_scale",
     "not finite and > 0"),
    # wrong shapes or dtypes
    ("block-scale-shape", "nvfp4", put(f"{Q}.weight_scale", lambda w: w[:, :2].contiguous()), f"{Q}.weight_scale",
     "expected [64, 4]"),
    ("block-scale-dtype", "nvfp4", put(f"{Q}.weight_scale", lambda w: w.float()), f"{Q}.weight_scale",
     "dtype float32, expected float8_e4m3fn"),
    ("packed-weight-dtype", "nvfp4", put(f"{K}.weight", lambda w: w.to(torch.bfloat16)), f"{K}.weight",
     "dtype bfloat16, expected uint8"),
    ("global-scale-shape", "nvfp4", put(f"{V}.weight_scale_2", torch.ones(2, dtype=F32)), f"{V}.weight_scale_2",
     "expected one element"),
    ("input-scale-dtype", "nvfp4", put(f"{V}.input_scale", lambda s: s.to(torch.bfloat16)), f"{V}.input_scale",
     "dtype bfloat16, expected float32"),
    ("fp8-weight-dtype", "fp8", put(f"{Q}.weight", lambda w: w.to(torch.float16)), f"{Q}.weight",
     "expected float8_e4m3fn"),
    ("fp8-negative-weight-scale", "fp8", put(f"{Q}.weight_scale", torch.tensor(-0.01)), f"{Q}.weight_scale",
     "finite and > 0"),
    ("fp8-input-scale-shape", "fp8", put(f"{Q}.input_scale", torch.ones(4, dtype=F32)), f"{Q}.input_scale",
     "expected one element"),
    # fused groups whose scales differ
    ("qkv-global-scales-differ", "nvfp4", put(f"{K}.weight_scale_2", lambda s: s * 2), "self_attn.{q_proj,k_proj,v_proj}",
     "must share weight_scale_2"),
    ("expert-gate-up-input-scales-differ", "nvfp4", put(f"{EXPERT}.up_proj.input_scale", lambda s: s * 3),
     f"{EXPERT}.{{gate_proj,up_proj}}", "must share input_scale"),
    ("fp8-qkv-input-scales-differ", "fp8", put(f"{V}.input_scale", lambda s: s / 2), "self_attn.{q_proj,k_proj,v_proj}",
     "must share input_scale"),
    ("half-quantized-fused-group", "nvfp4", both(
        drop(f"{L0}.mlp.experts.3.up_proj.weight_scale"), drop(f"{L0}.mlp.experts.3.up_proj.weight_scale_2"),
        drop(f"{L0}.mlp.experts.3.up_proj.input_scale"),
        put(f"{L0}.mlp.experts.3.up_proj.weight", torch.zeros(32, 64, dtype=torch.bfloat16))),
     f"{L0}.mlp.experts.3.{{gate_proj,up_proj}}", "mix quantized"),
    # missing or contradicting hf_quant_config fields
    ("hf-quant-algo-missing", "nvfp4", hq(lambda q: q.pop("quant_algo")), "config.json quantization_config",
     "quant_algo 'NVFP4' but hf_quant_config.json says None"),
    ("hf-quantization-section-missing", "nvfp4", edit_json("hf_quant_config.json", lambda j: j.pop("quantization")),
     "hf_quant_config.json", "no 'quantization' section"),
    ("hf-group-size-missing", "nvfp4", both(hq(lambda q: q.pop("group_size")),
                                            qc(lambda c: c["config_groups"]["group_0"]["weights"].pop("group_size"))),
     "quant_algo", "group_size None for NVFP4"),
    ("hf-kv-algo-missing", "nvfp4", hq(lambda q: q.pop("kv_cache_quant_algo")), "config.json quantization_config",
     "kv_cache_scheme means FP8 but hf_quant_config.json says None"),
    ("hf-exclude-missing", "nvfp4", hq(lambda q: q.pop("exclude_modules")), "config.json quantization_config",
     "ignore differs"),
    ("config-algo-disagrees", "nvfp4", qc(lambda c: c.update(quant_algo="FP8")), "config.json quantization_config",
     "quant_algo 'FP8' but hf_quant_config.json says 'NVFP4'"),
    ("exclude-is-a-string", "nvfp4", both(hq(lambda q: q.update(exclude_modules="lm_head")),
                                          qc(lambda c: c.update(ignore="lm_head"))),
     "exclude_modules", "must be a list of module names"),
    ("group-size-not-integer", "nvfp4", hq(lambda q: q.update(group_size="16")), "group_size",
     "must be a positive integer"),
    # exclude lists that name quantized modules
    ("exclude-names-quantized", "nvfp4", both(hq(lambda q: q["exclude_modules"].append(Q)),
                                              qc(lambda c: c["ignore"].append(Q))), Q, "exclude_modules entry"),
    ("exclude-wildcard-hits-experts", "nvfp4", both(hq(lambda q: q["exclude_modules"].append("*.experts.5.*")),
                                                    qc(lambda c: c["ignore"].append("*.experts.5.*"))),
     f"{EXPERT}.down_proj", "'*.experts.5.*' excludes it"),
    ("ct-ignore-names-quantized", "ct", qc(lambda c: c["ignore"].append(Q)), Q, "ignore entry"),
    # an unquantized projection nobody excluded
    ("unquantized-not-excluded", "fp8", both(
        *(drop(f"{L0}.mlp.down_proj.{s}") for s in ("weight_scale", "input_scale")),
        put(f"{L0}.mlp.down_proj.weight", torch.zeros(64, 128, dtype=torch.bfloat16))),
     f"{L0}.mlp.down_proj.weight", "not in the exclude_modules list"),
    # KV-cache scales
    ("kv-scale-missing", "nvfp4", drop(f"{L1}.self_attn.k_proj.k_scale"), f"{L1}.self_attn.k_proj.k_scale", "missing"),
    ("kv-scale-nan", "nvfp4", put(f"{L0}.self_attn.v_proj.v_scale", torch.tensor(math.nan)),
     f"{L0}.self_attn.v_proj.v_scale", "finite and > 0"),
    ("kv-scale-zero", "ct", put(f"{L1}.self_attn.k_scale", lambda s: torch.zeros_like(s)), f"{L1}.self_attn.k_scale",
     "finite and > 0"),
    ("kv-scales-undeclared", "nvfp4", both(hq(lambda q: q.update(kv_cache_quant_algo=None)),
                                           qc(lambda c: c.pop("kv_cache_scheme"))),
     "k_proj.k_scale", "config declares no KV-cache quantization"),
    # compressed-tensors
    ("ct-global-scale-zero", "ct", put(f"{Q}.weight_global_scale", lambda s: torch.zeros_like(s)),
     f"{Q}.weight_global_scale", "finite and > 0"),
    ("ct-input-global-scale-missing", "ct", drop(f"{K}.input_global_scale"), f"{K}.input_global_scale", "missing"),
    ("ct-status-missing", "ct", qc(lambda c: c.pop("quantization_status")), "quantization_config",
     "quantization_status None"),
    ("ct-format-unknown", "ct", qc(lambda c: c.update(format="nvfp3-pack-quantized")), "format", "unknown"),
    ("ct-targets-bad-regex", "ct", qc(lambda c: c["config_groups"]["group_0"].update(targets=["re:(("])), "targets",
     "must be a list of module names or patterns"),
    # the files
    ("shard-missing", "nvfp4", lambda d: (d / "model-00002-of-00002.safetensors").unlink(),
     "model-00002-of-00002.safetensors", "missing"),
    ("shard-truncated", "nvfp4", truncate, "model-00002-of-00002.safetensors", "unreadable safetensors file"),
    ("tensor-not-in-index", "nvfp4", unlisted, f"{EXPERT}.up_proj.weight_scale", f"not listed in {INDEX}"),
    ("index-names-absent-tensor", "nvfp4", listed_elsewhere, f"{Q}.weight_not_there", "which does not contain it"),
    ("index-unreadable", "nvfp4", lambda d: (d / INDEX).write_text("{"), INDEX, "unreadable"),
]


def _verify(capsys, d: Path) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["verify", str(d), "--max-findings", "100000"])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_corpus_is_large_and_the_bases_pass(bases, capsys):
    assert len(DEFECTS) + len(UNCHECKABLE) >= 30
    assert len({d[0] for d in DEFECTS}) == len(DEFECTS)
    for base in bases.values():
        code, out, _ = _verify(capsys, base)
        assert code == 0, out


@pytest.mark.parametrize(("case", "base", "edit", "tensor", "problem"), DEFECTS, ids=[d[0] for d in DEFECTS])
def test_verify_names_every_planted_defect(bases, tmp_path, capsys, case, base, edit, tensor, problem):
    d = tmp_path / case
    shutil.copytree(bases[base], d)
    edit(d)
    code, out, err = _verify(capsys, d)
    assert "Traceback" not in out + err
    assert code == 1, out + err
    findings = [ln[4:] for ln in out.splitlines() if ln.startswith("  - ")]
    assert any(f.split(": ", 1)[0].find(tensor) >= 0 and problem in f for f in findings), "\n".join(findings)


# Nothing to check: one line on stderr, exit 2.
UNCHECKABLE = [
    ("config-not-json", lambda d: (d / "config.json").write_text("{"), "not readable JSON"),
    ("hf-quant-config-not-json", lambda d: (d / "hf_quant_config.json").write_text("[1,"), "not readable JSON"),
    ("no-config", lambda d: (d / "config.json").unlink(), "has no config.json"),
    ("no-quantization-config", both(lambda d: (d / "hf_quant_config.json").unlink(),
                                    edit_json("config.json", lambda j: j.pop("quantization_config"))),
     "no quantization config"),
    ("unknown-quant-method", both(lambda d: (d / "hf_quant_config.json").unlink(),
                                  qc(lambda c: c.update(quant_method="gptq"))), "is not a layout verify knows"),
]


@pytest.mark.parametrize(("case", "edit", "message"), UNCHECKABLE, ids=[u[0] for u in UNCHECKABLE])
def test_an_uncheckable_directory_is_one_line_exit_2(bases, tmp_path, capsys, case, edit, message):
    d = tmp_path / case
    shutil.copytree(bases["nvfp4"], d)
    edit(d)
    code, out, err = _verify(capsys, d)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err
