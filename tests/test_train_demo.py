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


@pytest.mark.parametrize("steps", ["0", "-5", "two"])
def test_demo_refuses_a_step_count_below_one_before_writing_anything(tmp_path, capsys, steps):
    from longcat_tuner.cli import main

    folder = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", str(folder), "--steps", steps, "--no-progress"])
    assert exit_info.value.code == 2
    assert "--steps" in capsys.readouterr().err
    assert not folder.exists()  # 0 used to write the whole demo (15 MB), then refuse max_train_steps
