"""Which sibling projections a serving engine fuses into one GEMM.

Consumers: the scale computation (fused siblings share `weight_scale_2` and `input_scale`,
because vLLM/SGLang/TRT-LLM load them into one fused weight with a single global scale) and
`verify` (which checks that they do). Matched on the last name component of sibling modules
under the same parent, so it holds for per-expert names (`experts.7.gate_proj`) too.
"""

FUSED_SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # vLLM QKVParallelLinear
    ("gate_proj", "up_proj"),  # MergedColumnParallelLinear, and per-expert w13
    ("w1", "w3"),  # Mixtral-style expert names for gate/up
    ("q_a_proj", "kv_a_proj_with_mqa"),  # DeepSeek-V3 MLA: fused_qkv_a_proj
)


def fused_group_of(leaf: str) -> tuple[str, ...] | None:
    """The fused sibling group a module's last name component belongs to, if any."""
    for group in FUSED_SIBLINGS:
        if leaf in group:
            return group
    return None


def fused_groups(module_names: list[str]) -> list[list[str]]:
    """Partition full module names into fused groups (siblings present under one parent).

    Names with no fused siblings come back as groups of one.
    """
    by_key: dict[tuple[str, tuple[str, ...] | None], list[str]] = {}
    order: list[tuple[str, tuple[str, ...] | None]] = []
    for name in module_names:
        parent, _, leaf = name.rpartition(".")
        group = fused_group_of(leaf)
        key = (parent, group) if group else (name, None)
        if key not in by_key:
            by_key[key] = []
            order.append(key)
        by_key[key].append(name)
    return [by_key[k] for k in order]
