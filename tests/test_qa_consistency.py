"""QA pass on consistency between commands:

1. `NotRegularFileError` (an output path that is a device, pipe, socket or folder) met outside `sample --output` and
   `export-lora` surfaced as a traceback; the CLI now reports it as a user error (exit 2);
3. a `seed` changed between a run and its resume was silently ignored (the checkpoint's random state wins): `train`
   warns at resume and `check` reports the same warning;
4. `export-lora`'s in-place refusal suggested `..._comfyui-wanvideowrapper.safetensors`, not the names `train` writes.
"""
from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch

from longcat_tuner.errors import ConfigError
from longcat_tuner.train import checkpoint as ckpt


# --- 1. NotRegularFileError through the CLI ------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_cli_reports_a_pipe_as_output_as_a_user_error(tmp_path, monkeypatch, capsys):
    """Before: a command whose writer met a pipe where it writes a file ended in an OSError traceback."""
    from longcat_tuner import cli
    from longcat_tuner.commands import plan
    from longcat_tuner.fsutil import atomic_file

    pipe = tmp_path / "plan.json"
    os.mkfifo(pipe)

    def run(args):  # a command path that writes through `atomic_file` without a check of its own
        with atomic_file(pipe) as temporary:
            temporary.write_text("{}")
        return 0

    monkeypatch.setattr(plan, "run", run)
    assert cli.main(["plan", "--config", str(tmp_path / "config.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {pipe} is not a regular file") and "give a file name" in err
    assert "Traceback" not in err
    assert pipe.exists() and not pipe.is_file()  # the pipe is left as it was


# --- 3. a seed changed between a run and its resume ---------------------------------------------------------------
def _checkpoint(root: Path, seed: int) -> Path:
    return ckpt.save_checkpoint(
        root, step=1, weights={"w": torch.zeros(2)}, optimizer_state={"state": {}, "param_groups": []},
        scheduler_state={"last_epoch": 1}, trainer_state={"sampler": {"epoch": 0, "position": 1, "seed": seed}},
        rng_state=ckpt.capture_rng_state({}),
    )


def test_resume_with_another_seed_warns_in_train_and_check(tmp_path):
    from longcat_tuner.commands.check import run_warnings
    from longcat_tuner.train.outputs import resume_seed_warning

    checkpoint = _checkpoint(tmp_path / "out" / "checkpoints", seed=7)
    config = types.SimpleNamespace(seed=8, resume_from_checkpoint="latest", output_dir=str(tmp_path / "out"))
    warning = resume_seed_warning(checkpoint, config)
    assert warning and warning.startswith("warning: resume_from_checkpoint")
    assert "seed 8" in warning and "used seed 7" in warning and "seed 7 is used" in warning
    assert "Set seed: 7" in warning
    assert run_warnings(config) == [warning]  # `check` says what `train` says
    same = types.SimpleNamespace(seed=7, resume_from_checkpoint="latest", output_dir=str(tmp_path / "out"))
    assert resume_seed_warning(checkpoint, same) is None and run_warnings(same) == []
    fresh = types.SimpleNamespace(seed=8, resume_from_checkpoint=None, output_dir=str(tmp_path / "out"))
    assert run_warnings(fresh) == []


def test_train_prints_the_seed_warning_at_resume(tmp_path, monkeypatch, capsys):
    """`resume` prints the warning (the checkpoint's random state is then restored as before)."""
    from longcat_tuner.train import trainer

    checkpoint = _checkpoint(tmp_path / "checkpoints", seed=7)
    said = []
    parallel = types.SimpleNamespace(say=lambda message, **kwargs: said.append(message))

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(trainer.ckpt, "load_checkpoint", lambda path, tensors=True: {
        "state": {"sampler": {"seed": 7}, "world_size": 1}, "sharded": False, "scheduler": {}})
    monkeypatch.setattr(trainer, "check_resume_world_size", lambda *a, **k: None)
    monkeypatch.setattr(trainer, "check_resume_strategy", lambda *a, **k: None)
    parallel.loads_checkpoint_tensors = True
    parallel.world_size = 1
    parallel.checkpoint_layout = "ddp"
    parallel.load = lambda *a, **k: None
    run = types.SimpleNamespace(parallel=parallel, config=types.SimpleNamespace(seed=8), dit=None, optimizer=None,
                                scheduler=types.SimpleNamespace(load_state_dict=lambda state: None),
                                data=types.SimpleNamespace(sampler=types.SimpleNamespace(load_state_dict=stop)))
    with pytest.raises(Stop):  # stopped where the sampler position is restored, after the warning
        trainer.resume(run, checkpoint)
    assert any("seed 8" in line and "used seed 7" in line for line in said)


# --- 4. export-lora suggests the names training writes ------------------------------------------------------------
def test_export_lora_suggests_training_style_names(tmp_path):
    from longcat_tuner.commands.export_lora import check_output, suggested_name

    assert suggested_name(Path("longcat_lora.safetensors"), "comfyui-wanvideowrapper") == "longcat_lora_comfyui.safetensors"
    assert suggested_name(Path("longcat_lora.safetensors"), "wan2gp") == "longcat_lora_wan2gp.safetensors"
    assert suggested_name(Path("longcat_lora_wan2gp.safetensors"), "official") == "longcat_lora.safetensors"
    assert suggested_name(Path("mine.safetensors"), "diffusers") == "mine_diffusers.safetensors"
    # Never the input's own name: that is the refusal being explained.
    assert suggested_name(Path("mine.safetensors"), "official") == "mine_converted.safetensors"
    source = tmp_path / "longcat_lora.safetensors"
    source.write_bytes(b"x")
    with pytest.raises(ConfigError) as refused:
        check_output(source, source, overwrite=True, format="comfyui-wanvideowrapper")
    assert f"e.g. {tmp_path / 'longcat_lora_comfyui.safetensors'}" in str(refused.value)
    assert "wanvideowrapper.safetensors" not in str(refused.value)


def test_demo_refuses_a_pipe_named_like_its_config_without_reading_it(tmp_path, capsys):
    """`demo` into a folder whose config.json is a pipe waited forever reading it."""
    import os
    import threading

    from longcat_tuner.cli import main as cli_main

    os.mkfifo(tmp_path / "config.json")
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("code", cli_main(["demo", str(tmp_path), "--steps", "1"])),
                              daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # unblock the reader so the test process can end, then fail
        with open(tmp_path / "config.json", "w"):
            pass
        pytest.fail("demo blocked reading a pipe named config.json")
    assert result["code"] == 2 and "config.json" in capsys.readouterr().err
