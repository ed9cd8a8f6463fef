"""Read what a checkpoint declares about its quantization (layout, algorithm, exclusions).

Model Optimizer writes `hf_quant_config.json` and a `quant_method: "modelopt"`
`quantization_config` in config.json (`export/quant_utils.py` `get_quant_config`,
`export/convert_hf_config.py`); compressed-tensors writes only the config.json entry
(`quantization/quant_config.py` `QuantizationConfig`). Problems a user can fix in the config
become findings; a directory verify cannot check at all raises `QuantshipError`.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantship.errors import QuantshipError
from quantship.verify.result import Finding
from quantship.verify.specs import COMPRESSED_TENSORS, KNOWN_ALGOS, MATCHERS, MODELOPT

# compressed-tensors `format` -> the algorithm verify checks it as.
_CT_FORMATS = {"nvfp4-pack-quantized": "NVFP4", "float-quantized": "FP8"}
NVFP4_GROUP_SIZE = 16


@dataclass
class Declared:
    layout: str
    quant_algo: str | None
    group_size: int | None = None
    kv_algo: str | None = None
    exclude: tuple[str, ...] = ()
    # compressed-tensors module-name targets; None: every linear is targeted (e.g. "Linear").
    name_targets: tuple[str, ...] | None = None
    static_inputs: bool = True  # activation scales are stored per module
    kv_per_head: bool = False
    findings: list[Finding] = field(default_factory=list)

    def excluded_by(self, module: str) -> str | None:
        """The exclude/ignore entry that matches `module`, if any."""
        matches = MATCHERS[self.layout]
        return next((p for p in self.exclude if matches(module, p)), None)

    def expects_quantized(self, module: str) -> bool:
        if self.excluded_by(module) is not None:
            return False
        if self.name_targets is None:
            return True
        return any(MATCHERS[self.layout](module, t) for t in self.name_targets)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise QuantshipError(f"{path}: not readable JSON ({e}); re-export the checkpoint") from e


def read_declared(root: Path) -> Declared:
    config = _load_json(root / "config.json")
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    qc = qc if isinstance(qc, dict) else None
    method = qc.get("quant_method") if qc else None
    hf_quant_path = root / "hf_quant_config.json"
    hf_quant = _load_json(hf_quant_path) if hf_quant_path.is_file() else None
    # config.json decides: compressed-tensors' converter copies hf_quant_config.json along.
    if method == COMPRESSED_TENSORS:
        return _from_compressed_tensors(qc)
    if method == MODELOPT or (method is None and hf_quant is not None):
        return _from_modelopt(hf_quant, qc if method == MODELOPT else None)
    if qc is not None:
        raise QuantshipError(
            f"{root}: quantization_config.quant_method {method!r} is not a layout verify knows; "
            "it checks modelopt and compressed-tensors checkpoints"
        )
    raise QuantshipError(
        f"{root} has no quantization config (no hf_quant_config.json, no quantization_config in "
        "config.json); pass the directory a quantized export wrote"
    )


# Configs are JSON written by many tools (and by hand): every value verify reads goes through one
# of these first, so a wrong type is a finding (or a fallback) and never a traceback.


def _obj(value: Any) -> dict:
    """A JSON object, or {} for anything else."""
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    """A format name as a string (a list or number becomes its JSON text, which no spec knows)."""
    return value if value is None or isinstance(value, str) else json.dumps(value)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _names(value: Any, where: str, findings: list[Finding], layout: str) -> tuple[str, ...]:
    """A list of module names or patterns. Anything else is a finding: engines iterate it (a bare
    string would be read letter by letter) and match each entry; only valid entries are kept."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else []
    names = tuple(v for v in items if isinstance(v, str) and _valid_pattern(v, layout))
    if not isinstance(value, list) or len(names) != len(items):
        findings.append(Finding(where, f"must be a list of module names or patterns, got {_short(value)}"))
    return names


def _valid_pattern(name: str, layout: str) -> bool:
    if layout != COMPRESSED_TENSORS or not name.startswith("re:"):
        return True
    try:
        re.compile(name[3:])
    except re.error:
        return False
    return True


def _group_size(value: Any, where: str, findings: list[Finding]) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    findings.append(Finding(where, f"group_size must be a positive integer, got {_short(value)}"))
    return None


def _kv_algo(scheme: Any) -> str | None:
    """quant_algo name of a kv_cache_scheme: a compressed-tensors-style dict (num_bits/type), or
    the bare algorithm string Model Optimizer writes for anything but FP8 (e.g. "NVFP4",
    modelopt/torch/export/convert_hf_config.py)."""
    if isinstance(scheme, str):
        return scheme.upper()
    if not isinstance(scheme, dict):
        return None
    bits, kind = scheme.get("num_bits"), scheme.get("type")
    if not (isinstance(bits, int) and isinstance(kind, str)):
        return f"{kind}{bits}"
    return {(8, "float"): "FP8", (4, "float"): "NVFP4"}.get((bits, kind), f"{kind}{bits}")


def _group_weights(qc: dict) -> list[dict]:
    groups = qc.get("config_groups") or {}
    return [g for g in groups.values() if isinstance(g, dict)] if isinstance(groups, dict) else []


def _weights_group_size(groups: list[dict], where: str, findings: list[Finding]) -> int | None:
    sizes = [_obj(g.get("weights")).get("group_size") for g in groups]
    return _group_size(next((s for s in sizes if s is not None), None), where, findings)


def _check_algo(d: Declared, where: str, key: str = "quant_algo") -> None:
    if d.quant_algo is None:
        d.findings.append(Finding(where, f"{key} missing; a serving engine cannot tell the format"))
    elif d.quant_algo not in KNOWN_ALGOS:
        d.findings.append(Finding(where, f"{key} {d.quant_algo!r} unknown (verify knows {KNOWN_ALGOS})"))
    elif d.quant_algo == "NVFP4" and d.group_size != NVFP4_GROUP_SIZE:
        d.findings.append(Finding(where, f"group_size {d.group_size} for NVFP4; it must be 16"))


def _from_modelopt(hf_quant: Any, qc: dict | None) -> Declared:
    q = hf_quant.get("quantization") if isinstance(hf_quant, dict) else None
    findings = []
    if hf_quant is not None and not isinstance(q, dict):
        findings.append(Finding("hf_quant_config.json", "no 'quantization' section"))
    q, qc = _obj(q), qc or {}
    groups = _group_weights(qc)
    algo = _text(q.get("quant_algo") or qc.get("quant_algo"))
    kv = _text(q.get("kv_cache_quant_algo")) if "kv_cache_quant_algo" in q else _kv_algo(qc.get("kv_cache_scheme"))
    where = "hf_quant_config.json quantization" if "exclude_modules" in q else "config.json quantization_config"
    exclude = (q.get("exclude_modules"), f"{where}.exclude_modules") if "exclude_modules" in q else (
        qc.get("ignore"), f"{where}.ignore")
    hq = "hf_quant_config.json quantization.group_size"
    d = Declared(
        layout=MODELOPT,
        quant_algo=algo,
        group_size=_group_size(q["group_size"], hq, findings) if "group_size" in q
        else _weights_group_size(groups, "config.json quantization_config.config_groups", findings),
        kv_algo=kv,
        exclude=_names(*exclude, findings, MODELOPT),
        findings=findings,
    )
    if q and qc:
        _check_modelopt_agree(d, q, qc)
    _check_algo(d, "hf_quant_config.json quantization.quant_algo" if q else "config.json quantization_config")
    return d


def _check_modelopt_agree(d: Declared, q: dict, qc: dict) -> None:
    """vLLM reads config.json's copy, TRT-LLM hf_quant_config.json: they must say the same."""
    where = "config.json quantization_config"
    if qc.get("quant_algo") != q.get("quant_algo"):
        d.findings.append(
            Finding(
                where,
                f"quant_algo {qc.get('quant_algo')!r} but hf_quant_config.json says {q.get('quant_algo')!r}",
            )
        )
    kv_cfg = _kv_algo(qc.get("kv_cache_scheme"))
    if kv_cfg != q.get("kv_cache_quant_algo"):
        d.findings.append(
            Finding(
                where,
                f"kv_cache_scheme means {kv_cfg} but hf_quant_config.json says {q.get('kv_cache_quant_algo')}",
            )
        )
    ignore, exclude = (set(_names(x, where, [], MODELOPT)) for x in (qc.get("ignore"), q.get("exclude_modules")))
    if ignore != exclude:
        d.findings.append(Finding(where, "ignore differs from hf_quant_config.json exclude_modules"))


def _from_compressed_tensors(qc: dict) -> Declared:
    where = "config.json quantization_config"
    groups = _group_weights(qc)
    findings = []
    formats = {_text(g.get("format")) for g in groups if g.get("format")}
    fmt = _text(qc.get("format")) or (next(iter(formats)) if len(formats) == 1 else None)
    if len(formats) > 1 or fmt == "mixed-precision":
        findings.append(
            Finding(where, f"mixed formats {sorted(formats)}; verify checks one format per checkpoint")
        )
    if qc.get("quantization_status") != "compressed":
        findings.append(
            Finding(
                where,
                f"quantization_status {qc.get('quantization_status')!r}; a servable checkpoint is 'compressed'",
            )
        )
    for name, g in sorted(_obj(qc.get("config_groups")).items()):
        for key in ("weights", "input_activations"):
            if not isinstance(g, dict) or not isinstance(g.get(key), dict | None):
                findings.append(Finding(f"{where}.config_groups.{name}", f"{key} must be an object"))
    inputs = [g.get("input_activations") for g in groups]
    targets = [t for g in groups for t in _names(g.get("targets"), f"{where} targets", findings, COMPRESSED_TENSORS)]
    # A target without "re:" and without a dot is a class name ("Linear"): it targets every linear.
    by_class = any(not t.startswith("re:") and "." not in t for t in targets)
    kv = qc.get("kv_cache_scheme")
    algo = _CT_FORMATS.get(fmt, fmt)
    if algo == "FP8" and any(_obj(g.get("weights")).get("strategy") == "block" for g in groups):
        algo = "FP8_BLOCK"  # block scales [out/b, in/b]: not a layout verify checks yet
    d = Declared(
        layout=COMPRESSED_TENSORS,
        quant_algo=algo,
        group_size=_weights_group_size(groups, f"{where}.config_groups", findings),
        kv_algo=_kv_algo(kv),
        exclude=_names(qc.get("ignore"), f"{where}.ignore", findings, COMPRESSED_TENSORS),
        name_targets=None if by_class or not targets else tuple(targets),
        static_inputs=bool(groups)
        and all(isinstance(a, dict) and a.get("dynamic") is not True for a in inputs),
        kv_per_head=isinstance(kv, dict) and kv.get("strategy") == "attn_head",
        findings=findings,
    )
    _check_algo(d, f"{where}.format", key="format")
    return d
