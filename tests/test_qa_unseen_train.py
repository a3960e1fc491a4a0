"""Training cases the other tests did not cover: messy configs, other DiT shapes, frame counts at the edges.

Each test failed before its fix: `num_train_epochs` alone trained max_train_steps' default 1000 steps; a
`video.min_frames` that is not 1 + 4k skipped clips that had that many frames ("7 frames ..., 7 needed"); a DiT
whose head_dim is odd passed `check` and stopped the first training step with a RoPE shape traceback.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from longcat_tuner.config.training import TrainConfig
from longcat_tuner.errors import CheckpointError

BASE = {"pretrained_model_name_or_path": "/m", "output_dir": "/o", "data_backend_config": "/d.json"}


@pytest.mark.parametrize(
    "keys, steps, epochs",
    [
        ({"num_train_epochs": 3}, None, 3),  # epochs alone: they decide (it used to be 1000 steps)
        ({"num_train_epochs": 3, "max_train_steps": 7}, 7, 3),  # both written: max_train_steps wins, as before
        ({"num_train_epochs": 3, "max_train_steps": None}, None, 3),
        ({}, 1000, None),  # neither: the default steps
    ],
)
def test_num_train_epochs_alone_decides_the_run_length(keys, steps, epochs):
    from longcat_tuner.train.trainer import total_optimizer_steps

    config = TrainConfig.from_dict({**BASE, **keys})
    assert (config.max_train_steps, config.num_train_epochs) == (steps, epochs)
    # 5 batches an epoch, 2 micro-batches a step: 3 epochs are 8 optimizer steps.
    expected = steps if steps is not None else 8
    assert total_optimizer_steps(config.model_copy(update={"gradient_accumulation_steps": 2}), 5) == expected


def test_num_train_epochs_from_a_file_and_a_flag(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, "num_train_epochs": 2}))
    assert TrainConfig.from_file(path).max_train_steps is None
    path.write_text(json.dumps(BASE))
    assert TrainConfig.from_file(path, overrides={"num_train_epochs": 4}).max_train_steps is None
    assert TrainConfig.from_file(path, overrides={"num_train_epochs": 4, "max_train_steps": 9}).max_train_steps == 9


def test_min_frames_that_is_not_one_plus_4k_keeps_clips_of_that_length(tmp_path):
    from longcat_tuner.config.datasets import parse_datasets
    from longcat_tuner.data.backends import plan_data
    from longcat_tuner.data.synthetic import write_video
    from longcat_tuner.data.video import clip_frame_count

    assert clip_frame_count(7, 13, 7, None) == 5  # was None: skipped though it has min_frames frames
    assert clip_frame_count(8, 13, 7, None) == 5
    assert clip_frame_count(6, 13, 7, None) is None  # shorter than min_frames: still skipped
    assert clip_frame_count(60, 93, 61, None) is None and clip_frame_count(60, 93, 33, None) == 57

    clips = tmp_path / "clips"
    for frames in (6, 7, 11, 13):
        write_video(clips / f"c{frames}.mp4", frames=frames, fps=15, height=32, width=32)
        (clips / f"c{frames}.txt").write_text(f"{frames} frames")
    datasets = parse_datasets([{
        "id": "clips", "dataset_type": "video", "instance_data_dir": str(clips), "resolution": "32x32",
        "cache_dir_vae": str(tmp_path / "cache"), "video": {"num_frames": 13, "min_frames": 7},
    }])
    (plan,) = plan_data(datasets, eval_dataset_id=None).train
    frames = {Path(s.source.media_path).stem: s.bucket.frames for s in plan.samples}
    assert frames == {"c7": 5, "c11": 9, "c13": 13}
    (skipped,) = plan.skipped
    assert "c6.mp4" in str(skipped.path) and "6 frames" in skipped.reason and "7 needed" in skipped.reason


def test_dit_with_an_odd_head_dim_is_refused_naming_the_file(tmp_path):
    from longcat_tuner.model.config import DiTConfig
    from longcat_tuner.model.inspect import require_intact_model
    from longcat_tuner.model.random_checkpoint import write_dit

    odd = DiTConfig(hidden_size=66, depth=1, num_heads=2, caption_channels=32, adaln_tembed_dim=16)
    with pytest.raises(CheckpointError, match=r"dit/config.json: hidden_size 66 / num_heads 2 gives an odd head_dim 33"):
        DiTConfig.from_dict(odd.to_dict(), source="dit/config.json")
    write_dit(tmp_path / "dit", odd)  # the random checkpoint writer takes it; `check`, `train` and `sample` must not
    with pytest.raises(CheckpointError, match=r"odd head_dim 33.*must be even"):
        require_intact_model(tmp_path)
    # Even head dims other than the release's 128 stay fine (34, 8, 2).
    for hidden, heads in ((68, 2), (48, 6), (8, 4)):
        assert DiTConfig.from_dict({"hidden_size": hidden, "num_heads": heads}).head_dim % 2 == 0
