"""What `verify` reports: a list of findings, each naming the tensor (or module, group, file)
that is wrong and how, so a user can go straight to the offending entry."""

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Finding:
    """One problem: `tensor` is a tensor name, or a module / fused group / file name."""

    tensor: str
    problem: str

    def __str__(self) -> str:
        return f"{self.tensor}: {self.problem}"


@dataclass
class VerifyResult:
    """The outcome of `verify_checkpoint`; `ok` when no finding was made."""

    path: Path
    layout: str  # "modelopt" | "compressed-tensors"
    quant_algo: str | None
    n_quantized_modules: int = 0
    n_tensors: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self, max_findings: int = 10) -> str:
        """A few lines for a terminal: what was checked, OK/FAILED, the first findings."""
        n = len(self.findings)
        status = "OK" if self.ok else f"FAILED ({n} finding{'s' if n != 1 else ''})"
        lines = [
            f"{self.path}: {status}",
            f"  layout {self.layout}, quant_algo {self.quant_algo or 'unknown'}",
            f"  {self.n_quantized_modules} quantized modules, {self.n_tensors} tensors",
        ]
        lines += [f"  - {f}" for f in self.findings[:max_findings]]
        if n > max_findings:
            lines.append(f"  ... and {n - max_findings} more")
        return "\n".join(lines)
