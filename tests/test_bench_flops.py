"""The FLOP counts the benchmarks divide by (bench/common.py): per clip shape, and for block-sparse attention
only the selected work, so a benchmark at 704x1280 or with block-sparse attention reports its own MFU."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from common import block_sparse_kept, forward_flops, lora_train_flops  # noqa: E402

from longcat_tuner.model.config import DiTConfig  # noqa: E402

GUIDE = (1, 16, 24, 60, 104)  # 480x832x93
BSA_512 = (1, 16, 24, 64, 104)  # 512x832x93: a 24x32x52 token grid, 6x8x13 = 624 blocks of 4x4x4


def test_forward_flops_of_the_guide_clip():
    fwd = forward_flops(DiTConfig(), GUIDE)
    assert fwd["tokens"] == 37_440
    assert (fwd["linear"] + fwd["attention"]) / 1e12 == pytest.approx(1917.424, abs=1e-3)  # sampling's figure


def test_block_sparse_kept_is_the_selected_share_of_key_blocks():
    config = DiTConfig()
    assert block_sparse_kept(config, BSA_512) == 39 / 624  # int(0.0625 * 624) blocks
    ragged = block_sparse_kept(config, (1, 16, 24, 60, 104))  # 24x30x52: 6x8x13 blocks, the last row partial
    assert ragged == 39 / 624


def test_train_flops_follow_the_shape_and_the_sparse_work():
    config = DiTConfig()
    guide, larger = lora_train_flops(config, GUIDE), lora_train_flops(config, BSA_512)
    assert larger["model"] > guide["model"]
    dense = lora_train_flops(config, BSA_512, recompute="attention_saved")
    sparse = lora_train_flops(config, BSA_512, recompute="attention_saved", self_attention_kept=0.0625)
    fwd = forward_flops(config, BSA_512)
    assert sparse["model"] < dense["model"] / 2
    # only the noisy self-attention call shrinks: the linears, the condition call and cross-attention stay
    assert dense["model"] - sparse["model"] == pytest.approx(
        3 * (fwd["attention"] - forward_flops(config, BSA_512, self_attention_kept=0.0625)["attention"]))
    assert forward_flops(config, BSA_512, self_attention_kept=0.0625)["linear"] == fwd["linear"]
