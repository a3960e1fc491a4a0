"""`longcat-tuner demo`: the README's main command runs end to end without ../shared."""
from __future__ import annotations

import pytest

from longcat_tuner.train.events import read_events


@pytest.mark.slow
def test_demo_trains_and_reports_its_outputs(tmp_path, capsys):
    from longcat_tuner.cli import main

    assert main(["demo", str(tmp_path / "demo"), "--steps", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "demo" / "output"
    assert f"LoRA (official LongCat format): {run_dir / 'longcat_lora.safetensors'}" in out
    assert "validation video:" in out and (run_dir / "longcat_lora.safetensors").is_file()
    events = read_events(run_dir)
    assert events[-1]["status"] == "completed"
    videos = [item["video"] for e in events if e["event"] == "validation" for item in e["items"]]
    assert videos and all((run_dir / v).is_file() for v in videos)
    # The demo config is an ordinary config: `train --config` accepts it as written.
    from longcat_tuner.config import TrainConfig

    config = TrainConfig.from_file(tmp_path / "demo" / "config.json")
    assert config.pretrained_model_name_or_path == tmp_path / "demo" / "model"
