"""`verify`: prove a quantized Hugging Face checkpoint complete and servable against its
declared format, for Model Optimizer unified HF checkpoints and compressed-tensors ones,
whoever produced them.

Reads safetensors headers for structure and loads only scale tensors, one at a time, so a
checkpoint of any size can be verified on a small machine.
"""

from pathlib import Path

from quantship.errors import QuantshipError
from quantship.verify.checks import check_checkpoint
from quantship.verify.config import read_declared
from quantship.verify.result import Finding, VerifyResult
from quantship.verify.specs import SPECS
from quantship.verify.tensors import read_headers

__all__ = ["Finding", "VerifyResult", "verify_checkpoint"]


def verify_checkpoint(path: str | Path) -> VerifyResult:
    """Check a quantized checkpoint directory; every problem found is a `Finding`.

    Raises `QuantshipError` when there is nothing to verify: no such directory, no config.json,
    or no quantization config at all.
    """
    root = Path(path)
    if not root.is_dir():
        raise QuantshipError(f"{root}: no such checkpoint directory; pass the directory the export wrote")
    if not (root / "config.json").is_file():
        raise QuantshipError(f"{root} has no config.json; pass a Hugging Face checkpoint directory")
    declared = read_declared(root)
    infos, file_findings = read_headers(root)
    spec = SPECS.get((declared.layout, declared.quant_algo))
    quantized, tensor_findings = check_checkpoint(root, infos, declared, spec)
    return VerifyResult(
        path=root,
        layout=declared.layout,
        quant_algo=declared.quant_algo,
        n_quantized_modules=len(quantized),
        n_tensors=len(infos),
        findings=[*declared.findings, *file_findings, *tensor_findings],
    )
