"""The planner's sequence-parallel estimate (`runtime/planner.sequence_parallel_estimate`): pure arithmetic."""
from __future__ import annotations

import pytest

from longcat_tuner.runtime import planner


def test_one_rank_is_the_single_gpu_estimate():
    setting = planner.Setting(height=720, width=1280, frames=93)
    single, sp = planner.estimate(setting), planner.sequence_parallel_estimate(setting, 1)
    assert sp.tokens_per_rank == single.tokens == 24 * 45 * 80
    assert sp.communication_s == 0 and sp.step_s == single.step_s
    assert sp.peak_gib == pytest.approx(single.peak_gib, abs=0.02)


def test_token_memory_splits_weights_stay_and_the_all_to_all_costs_its_bytes():
    setting = planner.Setting(height=720, width=1280, frames=93)
    single, sp = planner.estimate(setting), planner.sequence_parallel_estimate(setting, 4, link_gbps=100.0)
    assert sp.tokens_per_rank == single.tokens // 4
    assert sp.memory_gib["base_weights"] == single.memory_gib["base_weights"]
    assert sp.memory_gib["checkpointed_inputs"] == pytest.approx(single.memory_gib["checkpointed_inputs"] / 4, abs=0.01)
    # q, k, v and the output: 4 bf16 hidden states of the rank's tokens a block, 3/4 of them sent, 3 passes.
    sent = planner.DEPTH * 4 * sp.tokens_per_rank * planner.HIDDEN * 2 * 3 / 4 * 3
    assert sp.communication_gib == pytest.approx(sent / 2**30, abs=0.01)
    assert sp.communication_s == pytest.approx(sent / 100e9, abs=0.01)
    assert sp.step_s == pytest.approx(single.step_s / 4 + sent / 100e9, abs=0.02)
    sharded = planner.sequence_parallel_estimate(setting, 4, shard_weights=True)
    assert sharded.memory_gib["base_weights"] == pytest.approx(single.memory_gib["base_weights"] / 4, abs=0.01)
    # A slower link costs more time, the same bytes.
    slow = planner.sequence_parallel_estimate(setting, 4, link_gbps=planner.LINK_GBPS["infiniband"])
    assert slow.communication_gib == sp.communication_gib and slow.communication_s > sp.communication_s
    with pytest.raises(ValueError, match="at least 1"):
        planner.sequence_parallel_estimate(setting, 0)


def test_plan_command_prints_the_sequence_parallel_estimate(tmp_path, capsys):
    import json

    from longcat_tuner.cli import main

    data = tmp_path / "multidatabackend.json"
    data.write_text("[]")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"pretrained_model_name_or_path": str(tmp_path), "data_backend_config": str(data),
                                  "output_dir": str(tmp_path / "out"), "lora_rank": 32, "sequence_parallel_size": 4}))
    assert main(["plan", "--config", str(config), "--resolution", "720x1280", "--frames", "93"]) == 0
    out = capsys.readouterr().out
    est = planner.sequence_parallel_estimate(planner.Setting(height=720, width=1280, frames=93, lora_rank=32), 4)
    assert f"sequence_parallel_size 4: {est.tokens_per_rank:,} tokens a GPU" in out
