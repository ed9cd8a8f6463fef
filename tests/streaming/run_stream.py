"""`python run_stream.py MODEL_DIR EXPORT VOCAB MAX_SHARD_BYTES`: one streaming run, as the
resume test launches it in a subprocess (killed by QUANTSHIP_TEST_KILL_AFTER_LAYER)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import calib_batches  # noqa: E402

from quantship.streaming import stream_quantize  # noqa: E402

if __name__ == "__main__":
    model_dir, export, vocab, max_shard = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    stream_quantize(model_dir, "nvfp4", calib_batches(vocab), export, kv_cache="fp8", moe_min_tokens=12,
                    device="cpu", max_shard_bytes=max_shard, progress=False)
