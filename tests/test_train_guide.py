"""The guide's config and dataset examples (config/*.example), with paths filled, train.

On the CPU the run is shortened with command-line overrides and the dataset's size/frames are shrunk
(480p x 93 frames cannot train on two CPU cores in a test budget); on CUDA both files are used exactly
as shipped, only the paths filled and the step count overridden on the command line.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from longcat_tuner.train.events import read_events

REPO = Path(__file__).resolve().parents[1]
TINY = REPO.parent / "shared" / "reference" / "longcat-tiny"
pytestmark = pytest.mark.skipif(not TINY.is_dir(), reason=f"tiny reference checkpoint not found at {TINY}")


def fill_paths(root: Path, *, frames: int, height: int, width: int, shrink: bool) -> Path:
    """The examples with only paths filled (the full-size product benchmark writes them the same way)."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_product import write_guide_config

    return write_guide_config(root, TINY, clips=2, frames=frames, height=height, width=width, shrink=shrink)


@pytest.mark.slow
def test_guide_examples_train_on_cpu(tmp_path):
    from longcat_tuner.cli import main

    config = fill_paths(tmp_path, frames=9, height=64, width=64, shrink=True)
    code = main(["train", "--config", str(config), "--no-progress", "--output_dir", str(tmp_path / "output"), "--max_train_steps", "2",
                 "--validation_resolution", "64x64", "--validation_num_video_frames", "9",
                 "--validation_num_inference_steps", "2", "--validation_max_samples", "1"])
    assert code == 0
    events = read_events(tmp_path / "output")
    assert events[0]["config"]["lora_rank"] == 8 and events[0]["config"]["eval_dataset_id"] == "longcat-video-val"
    assert events[-1]["status"] == "completed"
    assert (tmp_path / "output" / "longcat_lora.safetensors").is_file()


@pytest.mark.gpu
@pytest.mark.slow
def test_guide_examples_train_unchanged_on_cuda(tmp_path):
    """480x832, 93 frames, 40-step validation at guidance 4, exactly the shipped examples."""
    from longcat_tuner.cli import main

    config = fill_paths(tmp_path, frames=93, height=480, width=832, shrink=False)
    assert main(["train", "--config", str(config), "--no-progress", "--output_dir", str(tmp_path / "output"),
                 "--max_train_steps", "3"]) == 0
    events = read_events(tmp_path / "output")
    assert events[-1]["status"] == "completed"
    (validation,) = [e for e in events if e["event"] == "validation"]
    assert validation["items"] and all(item["psnr_first_frame"] > 5 for item in validation["items"])
