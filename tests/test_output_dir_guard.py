"""A new run into an output_dir that holds an earlier run's checkpoints or final files is refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from longcat_tuner.config.training import TrainConfig
from longcat_tuner.errors import ConfigError
from longcat_tuner.train import checkpoint as ckpt
from longcat_tuner.train.outputs import earlier_outputs
from longcat_tuner.train.trainer import train


def _config(tmp_path: Path, tiny_checkpoint, **keys) -> TrainConfig:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "pretrained_model_name_or_path": str(tiny_checkpoint), "data_backend_config": str(tmp_path / "missing.json"),
        "output_dir": str(tmp_path / "out"), "max_train_steps": 1, **keys,
    }))
    return TrainConfig.from_file(path)


def _finished_run(out: Path) -> None:
    done = out / "checkpoints" / ckpt.checkpoint_name(40)
    done.mkdir(parents=True)
    (done / ckpt.COMPLETE_MARKER).write_text("40\n")
    (out / "longcat_lora.safetensors").write_bytes(b"not touched")


def test_an_earlier_run_is_named_and_nothing_is_touched(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    _finished_run(out)
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    with pytest.raises(ConfigError) as err:
        train(_config(tmp_path, tiny_checkpoint), progress=False)
    message = str(err.value)
    assert "checkpoint-" in message and "longcat_lora.safetensors" in message
    assert "--resume_from_checkpoint latest" in message and "overwrite_output_dir" in message
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before  # no events, no lock left


def test_resume_or_overwrite_go_past_the_guard(tmp_path, tiny_checkpoint):
    """With either key the run gets as far as reading the data (here: a missing datasets file)."""
    _finished_run(tmp_path / "out")
    for keys in ({"resume_from_checkpoint": "latest"}, {"overwrite_output_dir": True}):
        with pytest.raises(ConfigError, match="missing.json"):
            train(_config(tmp_path, tiny_checkpoint, **keys), progress=False)


def test_overwrite_moves_the_earlier_run_into_a_superseded_folder(tmp_path, tiny_checkpoint):
    """Before: the earlier run stayed beside the new one, for `latest` to resume and the pruning to mix."""
    out = tmp_path / "out"
    _finished_run(out)
    (out / "events.jsonl").write_text('{"event": "start"}\n')
    (out / "validation" / "step-000040").mkdir(parents=True)
    (out / "validation" / "step-000040" / "video.mp4").write_bytes(b"video")
    (out / "notes.txt").write_text("mine")
    resume = _config(tmp_path, tiny_checkpoint, overwrite_output_dir=True, resume_from_checkpoint="latest")
    with pytest.raises(ConfigError, match="missing.json"):  # a resume wins: nothing is moved
        train(resume, progress=False)
    assert not [p for p in out.iterdir() if p.name.startswith("superseded-")]
    with pytest.raises(ConfigError, match="missing.json"):
        train(_config(tmp_path, tiny_checkpoint, overwrite_output_dir=True), progress=False)
    [aside] = [p for p in out.iterdir() if p.name.startswith("superseded-run-")]
    assert (aside / "checkpoints" / ckpt.checkpoint_name(40) / ckpt.COMPLETE_MARKER).is_file()
    assert (aside / "longcat_lora.safetensors").read_bytes() == b"not touched"
    assert (aside / "validation" / "step-000040" / "video.mp4").read_bytes() == b"video"
    assert '"start"' in (aside / "events.jsonl").read_text()
    assert earlier_outputs(out) == [] and (out / "notes.txt").read_text() == "mine"  # not the run's: left alone
    with pytest.raises(ConfigError, match="missing.json"):  # again within the second: a folder of its own
        train(_config(tmp_path, tiny_checkpoint, overwrite_output_dir=True), progress=False)
    assert len([p for p in out.iterdir() if p.name.startswith("superseded-run-")]) == 2


def test_an_empty_or_interrupted_folder_is_fine(tmp_path):
    assert earlier_outputs(tmp_path / "new") == []
    (tmp_path / "out" / "checkpoints" / ".tmp-checkpoint-x").mkdir(parents=True)  # never complete
    (tmp_path / "out" / "events.jsonl").write_text("")
    assert earlier_outputs(tmp_path / "out") == []


def test_the_demo_can_be_run_again_into_its_own_folder(tmp_path):
    """`scripts/demo.sh` twice (and the printed `train --config` after it) must not be refused."""
    from longcat_tuner.commands.demo import write_demo
    from longcat_tuner.train.trainer import refuse_finished_outputs

    config = TrainConfig.from_file(write_demo(tmp_path / "demo", steps=1, frames=5, height=32, width=32,
                                              train_clips=1, eval_clips=1))
    _finished_run(Path(config.output_dir))
    refuse_finished_outputs(config, Path(config.output_dir))
