"""Weight algorithms run after calibration: how each weight's quantized values are chosen.

`max` (default): round-to-nearest with scales from the weight's amax (Model Optimizer's `max`).
`gptq`: GPTQ error compensation, layer by layer (`sequential.py`), into the same tensors.
"""

from __future__ import annotations

from quantship.errors import QuantshipError

ALGORITHMS = ("max", "gptq")


def check_algorithm(name: str) -> str:
    if name not in ALGORITHMS:
        raise QuantshipError(f"unknown --algorithm {name!r}; choose one of: {', '.join(ALGORITHMS)}")
    return name
