"""Shape rules for the scale layouts of hf_ptq's formats beyond NVFP4 / per-tensor FP8, as
Model Optimizer 0.47 writes them (`export/quant_utils.py` `get_weight_scaling_factor`,
`export/unified_export_hf.py` `_export_quantized_weight`; our exports are checked byte for byte
against it in tests/formats/test_more_formats_modelopt.py), and the shapes a serving engine's
loader also accepts (compressed-tensors' per-channel `[out, 1]`, block scales without the
singleton axes). `checks.py` asks :func:`shape_problem` for every kind it does not know itself.
"""

from __future__ import annotations

MX_BLOCK = 32  # OCP MX: 32 elements per E8M0 scale, whatever the config says
FP8_TILE = 128  # fp8_pb_wo: 128 x 128 weight tiles


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def expected_shapes(kind: str, weight_shape: tuple[int, ...], in_features: int,
                    group_size: int | None) -> tuple[list[list[int]], str] | None:
    """(accepted shapes, what they mean) for a scale of `kind` next to a weight of
    `weight_shape` with `in_features` inputs; None where the kind is not one of ours or the
    config lacks what the rule needs (a config finding already)."""
    lead, rows = list(weight_shape[:-2]), weight_shape[-2]
    if kind == "rows":  # FP8 per channel, INT8: one per output row
        return [[*lead, rows], [*lead, rows, 1]], "one per output row"
    if kind == "tiles_128":  # fp8_pb_wo: Model Optimizer [R, 1, C, 1]; engines also read [R, C]
        r, c = _ceil(rows, FP8_TILE), _ceil(in_features, FP8_TILE)
        return [[*lead, r, 1, c, 1], [*lead, r, c]], f"one per {FP8_TILE}x{FP8_TILE} tile, edges rounded up"
    if kind == "int4_groups":  # the uint8 weight packs pairs of output rows: [out / 2, in]
        if not group_size or in_features % group_size:
            return None
        return [[*lead, 2 * rows, in_features // group_size]], f"[out, in/{group_size}], out = 2 x packed rows"
    if kind == "blocks_32":
        if in_features % MX_BLOCK:
            return [], f"{in_features} inputs, not a multiple of the MX block {MX_BLOCK}"
        return [[*lead, rows, in_features // MX_BLOCK]], f"one E8M0 exponent per {MX_BLOCK} inputs"
    if kind == "per_input":  # AWQ / SmoothQuant pre_quant_scale
        return [[*lead, in_features]], "one per input channel"
    return None


def shape_problem(kind: str, shape: list[int], weight_shape: tuple[int, ...] | None, in_features: int | None,
                  group_size: int | None) -> str | None:
    """A one-line finding when `shape` is not one the rule of `kind` accepts, else None."""
    if weight_shape is None or in_features is None or len(weight_shape) < 2:
        return None  # the weight itself is wrong: that is its own finding
    rule = expected_shapes(kind, weight_shape, in_features, group_size)
    if rule is None:
        return None
    accepted, meaning = rule
    if shape in accepted:
        return None
    if not accepted:
        return f"shape {shape}: {meaning}"
    return f"shape {shape}, expected {' or '.join(map(str, accepted))} ({meaning})"
