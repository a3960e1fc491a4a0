"""`check` catches what `train` would refuse seconds later, and names the fix; `plan` and `demo` say what a user needs."""
from __future__ import annotations

import json
import re
import shutil
from importlib.util import find_spec
from pathlib import Path

import pytest

from longcat_tuner.cli import main as cli_main
from longcat_tuner.errors import ConfigError
from tests.conftest import write_paired_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return write_paired_workspace(tmp_path_factory.mktemp("check"), train_clips=2, eval_clips=1, frames=5, size=32)


def write_config(folder: Path, workspace: Path, **keys) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.json"
    config.write_text(json.dumps({
        "pretrained_model_name_or_path": str(folder / "model"), "output_dir": str(folder / "out"),
        "data_backend_config": str(workspace / "multidatabackend.json"), "eval_dataset_id": "val", **keys,
    }))
    return config


def check(config: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = cli_main(["check", "--config", str(config), "--data-only", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_good_config_passes_and_prints_the_validation_cost(tmp_path, workspace, capsys):
    config = write_config(tmp_path, workspace, validation_resolution="480x832", validation_num_video_frames=93,
                          validation_num_inference_steps=40, validation_guidance=4.0, max_train_steps=1000,
                          validation_step_interval=100)
    code, out, err = check(config, capsys)
    assert code == 0, err
    # One CFG step at 480x832x93 measured 9.537 s on an H100: 40 steps, 1 eval video, validations at 100..1000.
    assert "[validation] 1 video(s) of 480x832x93 at 40 steps with CFG: ~382 s per video on an H100" in out
    assert "10 validation(s) -> ~64 min of the run; lower validation_num_inference_steps" in out
    assert "with the 13.6B model (9.5 s per step" in out  # a tiny demo checkpoint is not what is timed
    small = write_config(tmp_path / "small", workspace, validation_resolution="96x160", validation_num_video_frames=9,
                         validation_num_inference_steps=4, max_train_steps=6)
    code, out, err = check(small, capsys)
    assert code == 0, err
    assert "1 validation(s) -> ~0 min of the run\n" in out  # no advice to spend less on nothing
    code, out, _ = check(config, capsys, "--json")
    estimate = json.loads(out)["validation_estimate"]
    assert estimate["seconds_per_video"] == pytest.approx(381.5, abs=0.1)
    # The distilled-size pass (guidance 1: one forward per step) measured 4.766 s: the FLOP scaling predicts it.
    from longcat_tuner.commands.check import sampling_step_seconds

    assert sampling_step_seconds(480, 832, 93, guidance=1.0) == pytest.approx(4.766, rel=0.01)


@pytest.mark.parametrize("where,message", [
    ("file", "is a file, not a folder; set output_dir to a folder path"),
    ("under_file", "cannot be created: {blocker} is a file, not a folder"),
])
def test_output_dir_that_train_could_not_create(tmp_path, workspace, capsys, where, message):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    output_dir = blocker if where == "file" else blocker / "runs" / "x"
    config = write_config(tmp_path, workspace, output_dir=str(output_dir))
    code, _, err = check(config, capsys)
    assert code == 1
    assert message.format(blocker=blocker) in err


def test_unwritable_output_dir(tmp_path, workspace, capsys):
    if not Path("/proc").is_dir():
        pytest.skip("needs /proc (a file system nobody can write, root included)")
    config = write_config(tmp_path, workspace, output_dir="/proc/longcat-tuner-check/run")
    code, _, err = check(config, capsys)
    assert code == 1
    assert "output_dir /proc/longcat-tuner-check/run is not writable" in err and "choose a folder you can write to" in err


def test_output_dir_holding_an_earlier_run_fails_check_as_train_would(tmp_path, workspace, capsys):
    """`check` said ok and `train` refused a second later: a finished run in output_dir (no resume, no overwrite)."""
    done = tmp_path / "out" / "checkpoints" / "checkpoint-000040"
    done.mkdir(parents=True)
    (done / "COMPLETE").write_text("40\n")
    (tmp_path / "out" / "longcat_lora.safetensors").write_bytes(b"kept")
    code, _, err = check(write_config(tmp_path, workspace), capsys)
    assert code == 1
    assert "already holds an earlier run" in err and "checkpoint-000040" in err and "longcat_lora.safetensors" in err
    assert "--resume_from_checkpoint latest" in err and "overwrite_output_dir" in err
    for keys in ({"resume_from_checkpoint": "latest"}, {"overwrite_output_dir": True}):
        code, _, err = check(write_config(tmp_path, workspace, **keys), capsys)
        assert code == 0, err
    assert (tmp_path / "out" / "longcat_lora.safetensors").read_bytes() == b"kept"


def test_block_swap_without_cuda_is_refused(tmp_path, workspace, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the child process that asks torch sees no GPU
    config = write_config(tmp_path, workspace, musubi_blocks_to_swap=4)
    code, _, err = check(config, capsys)
    assert code == 1
    assert "musubi_blocks_to_swap 4 streams weights to a CUDA device and this machine has none" in err
    assert "set it to 0 here" in err


def test_missing_optional_packages_are_named(tmp_path, workspace, capsys):
    keys, expected = {}, []
    if find_spec("xformers") is None:
        keys["attention_implementation"] = "xformers"
        expected.append("xformers is not installed: `pip install xformers`, or set attention_implementation to auto")
    if find_spec("bitsandbytes") is None:
        keys["optimizer"] = "adamw8bit"
        expected.append("needs bitsandbytes, which is not installed: `pip install bitsandbytes`")
    if not keys:
        pytest.skip("xformers and bitsandbytes are both installed here")
    code, _, err = check(write_config(tmp_path, workspace, **keys), capsys)
    assert code == 1
    for message in expected:
        assert message in err


def test_missing_model_folder_does_not_exist(tmp_path, workspace, capsys):
    config = write_config(tmp_path, workspace)
    code = cli_main(["check", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"model folder {tmp_path / 'model'} (pretrained_model_name_or_path) does not exist" in err
    assert "lacks" not in err


def test_start_frame_in_the_wrong_subfolder_names_its_clip(tmp_path, workspace, capsys):
    data = tmp_path / "data"
    shutil.copytree(workspace / "data", data)
    datasets = json.loads((workspace / "multidatabackend.json").read_text())
    for entry in datasets:
        entry["instance_data_dir"] = entry["instance_data_dir"].replace(str(workspace / "data"), str(data))
    (tmp_path / "multidatabackend.json").write_text(json.dumps(datasets))
    starts = data / "train" / "start-frames"
    (starts / "moved").mkdir()
    (starts / "clip_000.png").rename(starts / "moved" / "clip_000.png")
    config = write_config(tmp_path, tmp_path)
    code, _, err = check(config, capsys)
    assert code == 1
    clip = data / "train" / "clips" / "clip_000.mp4"
    assert f"{starts / 'moved' / 'clip_000.png'}: start frame in the wrong folder: clip {clip} has this name" in err
    assert f"move this file to {starts / 'clip_000.png'}" in err


def test_plan_for_a_24_gb_card_names_the_allocator_setting_only_when_the_shell_turns_it_off(
        tmp_path, workspace, capsys, monkeypatch):
    config = write_config(tmp_path, workspace)
    args = ["plan", "--config", str(config), "--resolution", "480x832", "--frames", "93", "--gpu-memory"]
    for key in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(key, raising=False)
    assert cli_main(args + ["24"]) == 0  # train turns expandable segments on itself: nothing to advise
    out = capsys.readouterr().out
    assert "PYTORCH_CUDA_ALLOC_CONF" not in out and "allocator: expandable segments" in out
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:256")
    assert cli_main(args + ["24"]) == 0
    out = capsys.readouterr().out
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in out and "'max_split_size_mb:256'" in out
    assert cli_main(args + ["80"]) == 0
    assert "PYTORCH_CUDA_ALLOC_CONF=" not in capsys.readouterr().out  # an 80 GB card does not need it


def test_plan_on_a_small_checkpoint_says_train_takes_the_config_as_given(tmp_path, workspace, capsys, tiny_checkpoint):
    """On the tiny checkpoint `plan` printed an automatic 13.6B plan (48 uncheckpointed blocks) that `train`,
    which plans only the calibrated DiT, would never choose; it now says what `train` does."""
    config = write_config(tmp_path, workspace, pretrained_model_name_or_path=str(tiny_checkpoint))
    assert cli_main(["plan", "--config", str(config), "--resolution", "480x832", "--frames", "93"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("memory plan (config):") and "calibrated for the 13.6B DiT only" in out
    assert f"note: {tiny_checkpoint / 'dit'} is not the 13.6B LongCat-Video DiT" in out
    assert cli_main(["plan", "--config", str(write_config(tmp_path / "absent", workspace)), "--resolution", "480x832",
                     "--frames", "93"]) == 0  # no model folder here: the release's automatic plan, as before
    out = capsys.readouterr().out
    assert out.startswith("memory plan (auto):") and "note:" not in out


def test_help_does_not_claim_quanto_or_torchao_are_needed():
    import subprocess
    import sys

    for command in ("train", "sample"):
        text = subprocess.run([sys.executable, "-m", "longcat_tuner.cli", command, "--help"], capture_output=True,
                              text=True, timeout=120).stdout
        flat = " ".join(text.split())
        assert "need optimum-quanto" not in flat and "needs torchao" not in flat and "need torchao" not in flat
        assert "neither optimum-quanto nor torchao is needed" in flat or "no torchao or optimum-quanto needed" in flat


def test_demo_says_the_videos_are_noise_by_design(tmp_path):
    from PIL import Image

    from longcat_tuner.commands.demo import demo_guide, read_losses, write_loss_chart

    run = tmp_path / "output"
    run.mkdir()
    events = [{"event": "step", "step": s, "loss": 1.0 / s} for s in range(1, 11)]
    events += [{"event": "validation", "step": 5, "heldout_loss": 0.5}, {"event": "validation", "step": 10, "heldout_loss": 0.25}]
    (run / "events.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    losses, heldout = read_losses(run / "events.jsonl")
    assert len(losses) == 10 and heldout == {5: 0.5, 10: 0.25}
    chart = write_loss_chart(losses, heldout, run / "loss.png")
    assert Image.open(chart).size == (640, 320)
    text = demo_guide(run, loss_chart=chart, losses=losses, heldout=heldout)
    assert "random weights" in text and "coloured noise by design" in text and "proves the pipeline" in text
    assert "training loss: 0.7" in text and "step 5: 0.5000, step 10: 0.2500" in text
    assert "(falling: the LoRA fits the training clips)" in text
    # A loss that did not fall (a 2-step demo) is not called a fit.
    rising = demo_guide(run, losses={1: 2.42, 2: 2.66})
    assert "fits the training clips" not in rising and "not lower over 2 step(s)" in rising
    assert "default 40 steps show the fall" in rising
    flat = demo_guide(run, losses={step: 2.5 for step in range(1, 41)})
    assert "fits the training clips" not in flat and "default 40" not in flat
    for where in ("events.jsonl", "held-out loss", str(chart), "longcat_lora.safetensors", str(run / "validation")):
        assert where in text
    script = (Path(__file__).parent.parent / "scripts" / "demo.sh").read_text()
    assert "noise by design" in script


def test_demo_script_puts_a_relative_folder_where_it_was_run(tmp_path):
    """`bash scripts/demo.sh mydemo` from a folder of yours wrote mydemo/ inside the checkout (the script cd'ed there)."""
    import subprocess

    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(Path(__file__).parent.parent / "scripts" / "demo.sh", checkout / "scripts" / "demo.sh")
    (checkout / "scripts" / "setup.sh").write_text("pwd > setup-ran-in\n")  # the real one installs .venv
    bin_dir = checkout / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'PATH="{bin_dir}:$PATH"\n')
    (bin_dir / "longcat-tuner").write_text('#!/bin/sh\necho "$PWD $*"\n')
    (bin_dir / "longcat-tuner").chmod(0o755)
    user = tmp_path / "mine"
    user.mkdir()
    result = subprocess.run(["bash", str(checkout / "scripts" / "demo.sh"), "mydemo", "--steps", "3"], cwd=user,
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == f"{user} demo mydemo --steps 3"
    # `longcat-tuner` is only on PATH inside the script: the user is told how to get it after the demo.
    assert f". {checkout}/.venv/bin/activate" in result.stdout
    assert (checkout / "setup-ran-in").read_text().strip() == str(checkout)


def test_an_interrupted_train_prints_the_whole_resume_command(tmp_path, workspace, capsys, monkeypatch):
    """After Ctrl-C the console said only `resume with --resume_from_checkpoint latest`: of which command?"""
    from types import SimpleNamespace

    import longcat_tuner.train.trainer as trainer

    config = write_config(tmp_path, workspace)
    stopped = SimpleNamespace(status="interrupted", step=25, run_dir=tmp_path / "out", lora_path=None,
                              comfyui_lora_path=None, validation_videos=[])
    monkeypatch.setattr(trainer, "train", lambda config, progress: stopped)
    assert cli_main(["train", "--config", str(config)]) == 130
    out = capsys.readouterr().out
    assert f"interrupted at step 25; resume with: longcat-tuner train --config {config} --resume_from_checkpoint latest\n" in out
    assert cli_main(["train", "--config", str(config), "--max_train_steps", "3000"]) == 130
    assert "--resume_from_checkpoint latest (and the other options you gave this run)" in capsys.readouterr().out


def test_a_wrong_media_folder_names_the_datasets_file_it_is_in(tmp_path, workspace, capsys):
    """The fix named `multidatabackend.json` whatever the file was called (here `db_small.json`)."""
    datasets = json.loads((workspace / "multidatabackend.json").read_text())
    datasets[0]["instance_data_dir"] = str(tmp_path / "trian" / "clips")
    (tmp_path / "db_small.json").write_text(json.dumps(datasets))
    code, _, err = check(write_config(tmp_path, tmp_path, data_backend_config=str(tmp_path / "db_small.json")), capsys)
    assert code != 0
    assert f"instance_data_dir {tmp_path / 'trian' / 'clips'} does not exist or is not a folder; fix the path in " \
           f"{tmp_path / 'db_small.json'}" in err


def test_a_clip_dataset_pointed_at_the_start_frames_says_so(tmp_path, workspace, capsys):
    """`0 usable of 0 files` and "fix or add the files listed above" with nothing listed: the folder is now named."""
    datasets = json.loads((workspace / "multidatabackend.json").read_text())
    starts = next(d for d in datasets if d["id"] == datasets[0]["conditioning_data"][0])["instance_data_dir"]
    datasets[0]["instance_data_dir"] = starts
    (tmp_path / "db.json").write_text(json.dumps(datasets))
    code, out, _ = check(write_config(tmp_path, tmp_path, data_backend_config=str(tmp_path / "db.json")), capsys)
    assert code == 1
    assert f"warning: {starts}: no video files (.mp4" in out and "image file(s) (e.g. clip_000.png)" in out
    assert f"is it the start-frame folder? set instance_data_dir of dataset '{datasets[0]['id']}' in {tmp_path / 'db.json'}" in out


def test_a_checkpoints_training_state_given_as_a_lora_names_the_lora_beside_it(tmp_path, workspace, capsys):
    """`--lora checkpoint-N/trainable.safetensors` (listed by the folder error) listed every known LoRA layout
    and asked "Is this a LoRA for another model?"; it now points at the checkpoint's longcat_lora.safetensors."""
    import argparse

    import torch
    from safetensors.torch import save_file

    from longcat_tuner.commands.sample import read_sampling_loras

    folder = tmp_path / "out" / "checkpoints" / "checkpoint-000006"
    folder.mkdir(parents=True)
    (folder / "COMPLETE").write_text("6\n")
    state = folder / "trainable.safetensors"
    save_file({"blocks.0.attn.qkv.lora_adapters.default.down": torch.zeros(4, 8)}, str(state))
    fix = f"{state} is a checkpoint's training state, not a LoRA file; use {folder / 'longcat_lora.safetensors'}"
    (folder / "longcat_lora.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="--lora " + re.escape(fix)):
        read_sampling_loras(argparse.Namespace(lora=[str(state)], lora_multiplier=[]))
    assert cli_main(["export-lora", str(state), str(tmp_path / "x.safetensors")]) == 2
    assert fix in capsys.readouterr().err
    code, _, err = check(write_config(tmp_path / "c", workspace, init_lora=str(state)), capsys)
    assert code == 1 and f"init_lora: {fix}" in err


def test_an_interrupted_demo_says_how_to_resume_not_where_missing_files_are(tmp_path, workspace, capsys, monkeypatch):
    """Ctrl-C in the demo printed `LoRA (official LongCat format): None` and a guide to files never written."""
    from types import SimpleNamespace

    import longcat_tuner.commands.demo as demo
    import longcat_tuner.train.trainer as trainer

    config = write_config(tmp_path, workspace)
    monkeypatch.setattr(demo, "write_demo", lambda folder, steps: config)
    monkeypatch.setattr(trainer, "train", lambda config, progress: SimpleNamespace(
        status="interrupted", step=7, run_dir=tmp_path / "out", lora_path=None, comfyui_lora_path=None,
        validation_videos=[]))
    assert cli_main(["demo", str(tmp_path / "demo"), "--no-progress"]) == 130
    out = capsys.readouterr().out
    assert f"interrupted at step 7; resume with: longcat-tuner train --config {config} --resume_from_checkpoint latest" in out
    assert "None" not in out and "longcat_lora.safetensors" not in out


def test_config_and_datasets_files_swapped_are_named_as_such(tmp_path, workspace, capsys):
    """`--config multidatabackend.json` said only "expected a JSON object of settings"."""
    config = write_config(tmp_path, workspace)
    datasets = workspace / "multidatabackend.json"
    assert cli_main(["check", "--config", str(datasets)]) == 2
    err = capsys.readouterr().err
    assert "this file is a JSON list, like multidatabackend.json: --config takes config.json" in err
    assert '"data_backend_config": "multidatabackend.json"' in err
    assert cli_main(["check", "--data_backend_config", str(config)]) == 2
    assert "this is a training config, like config.json; data_backend_config" in capsys.readouterr().err


def test_no_progress_also_silences_the_libraries_bars(tmp_path, workspace, capsys, monkeypatch):
    """`train --no-progress` still wrote transformers' `Loading weights` bar into the log."""
    import os
    from types import SimpleNamespace

    from transformers.utils import logging as hf_logging

    import longcat_tuner.train.trainer as trainer

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)  # restored after the test
    seen = {}

    def fake_train(config, progress):
        seen.update(progress=progress, env=os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"),
                    bars=hf_logging.is_progress_bar_enabled())
        return SimpleNamespace(status="completed", step=1, run_dir=tmp_path / "out", lora_path=None,
                               comfyui_lora_path=None, validation_videos=[])

    monkeypatch.setattr(trainer, "train", fake_train)
    try:
        assert cli_main(["train", "--config", str(write_config(tmp_path, workspace)), "--no-progress"]) == 0
    finally:
        hf_logging.enable_progress_bar()
    assert seen == {"progress": False, "env": "1", "bars": False}


def test_every_option_of_every_subcommand_says_what_it_is():
    """`sample --help` listed `--prompt PROMPT` with no description."""
    import argparse

    from longcat_tuner.cli import build_parser

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bare = [f"{name} {action.option_strings or action.dest}" for name, parser in subcommands.choices.items()
            for action in parser._actions if not action.help]
    assert len(subcommands.choices) == 8 and bare == []


def test_a_demo_folder_that_cannot_be_used_is_named(tmp_path, capsys):
    """Before: a file, a symbolic link loop or a read-only place as the demo folder was a traceback."""
    (tmp_path / "file").write_text("mine")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for folder, said in ((tmp_path / "file", "is a file, not a folder"), (tmp_path / "loop", "symbolic link loop"),
                         (Path("/proc/longcat-tuner-demo"), "is not writable")):
        assert cli_main(["demo", str(folder), "--no-progress"]) == 2
        assert f"the demo folder {folder} " in (err := capsys.readouterr().err) and said in err
    assert (tmp_path / "file").read_text() == "mine"


def test_the_demo_never_writes_into_a_run_or_data_it_did_not_make(tmp_path, capsys):
    """`longcat-tuner demo .` in a folder without config.json but with output/ (a finished run) and data/ replaced
    that run's LoRA and checkpoint-000001 and the user's data/train/clips/clip_000.txt."""
    mine = tmp_path / "project"
    (mine / "output").mkdir(parents=True)
    (mine / "output" / "longcat_lora.safetensors").write_bytes(b"my finished LoRA")
    (mine / "data" / "train" / "clips").mkdir(parents=True)
    (mine / "data" / "train" / "clips" / "clip_000.txt").write_text("my caption")
    assert cli_main(["demo", str(mine), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{mine / 'data'}, {mine / 'output'}: not written by the demo" in err
    assert (mine / "output" / "longcat_lora.safetensors").read_bytes() == b"my finished LoRA"
    assert (mine / "data" / "train" / "clips" / "clip_000.txt").read_text() == "my caption"
    assert sorted(p.name for p in mine.iterdir()) == ["data", "output"]


def test_the_demo_never_replaces_a_config_it_did_not_write(tmp_path, capsys):
    """`longcat-tuner demo .` in a project folder replaced its config.json and multidatabackend.json silently."""
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.json").write_text('{"output_dir": "runs/mine"}')
    assert cli_main(["demo", str(mine), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{mine / 'config.json'}: not written by the demo" in err and "give the demo a new or empty folder" in err
    assert (mine / "config.json").read_text() == '{"output_dir": "runs/mine"}'
    assert sorted(p.name for p in mine.iterdir()) == ["config.json"]


def test_a_demo_rerun_keeps_a_config_the_user_edited(tmp_path):
    """Rerunning the demo into its folder reverted an edited config.json (it had the demo's eval split id, so it
    counted as the demo's own)."""
    import json

    from longcat_tuner.commands.demo import write_demo
    from longcat_tuner.errors import ConfigError

    small = dict(steps=1, frames=5, height=32, width=32, train_clips=1, eval_clips=1)
    config = write_demo(tmp_path / "demo", **small)
    assert write_demo(tmp_path / "demo", **small) == config  # unchanged: the demo may write it again
    edited = {**json.loads(config.read_text()), "learning_rate": 5e-4}
    config.write_text(json.dumps(edited))
    with pytest.raises(ConfigError, match=f"{config}: changed since the demo wrote it") as err:
        write_demo(tmp_path / "demo", **small)
    assert f"longcat-tuner train --config {config}" in str(err.value)
    assert json.loads(config.read_text())["learning_rate"] == 5e-4
    config.unlink()  # moved away: a fresh demo
    assert json.loads(write_demo(tmp_path / "demo", **small).read_text())["learning_rate"] == 1e-3


def test_resuming_a_finished_run_says_there_is_nothing_to_train(tmp_path, capsys):
    """`--resume_from_checkpoint latest` on a run already at max_train_steps ended printing only the run folder."""
    from longcat_tuner.commands.demo import write_demo

    config = write_demo(tmp_path / "demo", steps=2, frames=5, height=32, width=32, train_clips=1, eval_clips=1,
                        extra_config={"validation_step_interval": 100})
    assert cli_main(["train", "--config", str(config), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli_main(["train", "--config", str(config), "--no-progress", "--resume_from_checkpoint", "latest"]) == 0
    out = capsys.readouterr().out
    assert "nothing to train: the checkpoint is at step 2 and this run ends at step 2" in out
    assert "--max_train_steps 4" in out
    end = json.loads((tmp_path / "demo" / "output" / "events.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["lora_path"] is None and end["checkpoint"] is None  # was the string "None"


def test_sample_names_a_wrong_model_folder_first(tmp_path, capsys):
    """A mistyped --model was reported after a `compile: ...` line about a run that could never start
    (the LoRA files are still read first: test_hostile_files)."""
    code = cli_main(["sample", "--model", str(tmp_path / "nomodel"), "--prompt", "x", "--frames", "5",
                     "--output", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and f"--model {tmp_path / 'nomodel'} does not exist: give a LongCat-Video folder" in err
    assert "compile:" not in err


def test_a_bucket_smaller_than_the_batch_is_named_by_check(tmp_path, workspace, capsys):
    from longcat_tuner.commands.demo import write_split

    # One text-to-video clip beside the two image-to-video ones: with batch 2 it could never be trained on.
    clips, _ = write_split(tmp_path / "t2v", count=1, frames=5, height=32, width=32, seed=3)
    datasets = json.loads((workspace / "multidatabackend.json").read_text())
    datasets.append({"id": "t2v", "dataset_type": "video", "instance_data_dir": str(clips), "resolution": "32x32",
                     "cache_dir_vae": str(tmp_path / "cache" / "t2v"), "video": {"num_frames": 5}})
    (tmp_path / "multidatabackend.json").write_text(json.dumps(datasets))
    config = write_config(tmp_path, workspace, train_batch_size=2,
                          data_backend_config=str(tmp_path / "multidatabackend.json"))
    code, out, err = check(config, capsys)
    assert code == 0, err  # a warning: the other bucket trains
    assert ("warning: 1 training item(s) are never trained on: bucket(s) 5x32x32 text-to-video (1) hold fewer items "
            "(counting repeats) than train_batch_size 2") in out
    code, out, _ = check(config, capsys, "--json")
    assert json.loads(out)["batch_warnings"] and check(config, capsys, "--train_batch_size", "1")[1].count("never trained") == 0


def test_train_names_a_full_fine_tunes_weights_and_the_lora_format_it_wrote(tmp_path, workspace, capsys, monkeypatch):
    """A full fine-tune's dit/ folder (and a diffusers-only LoRA) were printed as `LoRA (official LongCat format)`."""
    from types import SimpleNamespace

    import longcat_tuner.train.trainer as trainer

    for keys, written, label in (
        ({"model_type": "full"}, "out/dit", "DiT weights (full fine-tune, the hub's dit/ layout)"),
        ({"lora_export_formats": ["diffusers"]}, "out/longcat_lora_diffusers.safetensors", "LoRA (diffusers)"),
        ({}, "out/longcat_lora.safetensors", "LoRA (official LongCat format)"),
    ):
        config = write_config(tmp_path, workspace, **keys)
        done = SimpleNamespace(status="completed", step=3, run_dir=tmp_path / "out", lora_path=tmp_path / written,
                               comfyui_lora_path=None, validation_videos=[])
        monkeypatch.setattr(trainer, "train", lambda config, progress: done)
        assert cli_main(["train", "--config", str(config)]) == 0
        assert f"{label}: {tmp_path / written}\n" in capsys.readouterr().out


def test_continuation_with_one_latent_samples_is_refused_before_training(tmp_path, workspace, capsys):
    """An image dataset (one latent) with video_continuation_latents 1 trained until its first batch came up, then
    stopped with `clips have 1 latents` (no dataset named)."""
    from PIL import Image

    from longcat_tuner.data.buckets import continuation_problem

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (90, 20, 20)).save(images / "still.png")
    (images / "still.txt").write_text("a still")
    datasets = json.loads((workspace / "multidatabackend.json").read_text())
    datasets.append({"id": "stills", "dataset_type": "image", "instance_data_dir": str(images), "resolution": "32x32",
                     "cache_dir_vae": str(tmp_path / "cache" / "stills")})
    (tmp_path / "multidatabackend.json").write_text(json.dumps(datasets))
    config = write_config(tmp_path, workspace, video_continuation_latents=1,
                          data_backend_config=str(tmp_path / "multidatabackend.json"))
    code, _, err = check(config, capsys)
    assert code == 1
    assert "video_continuation_latents 1 keeps that many latents" in err and "'stills' (1 latent frame(s))" in err
    # I2V clips keep their start frame instead; clips with a latent to spare pass; 2 latents need 9 frames.
    assert continuation_problem([("clips", 5, True), ("t2v", 5, False)], 1) is None
    assert "at least 9)" in continuation_problem([("t2v", 5, False)], 2)
    assert continuation_problem([("stills", 1, False)], 0) is None


def test_image_to_video_validation_of_one_latent_frame_is_refused_by_check(tmp_path, workspace, capsys):
    """validation_num_video_frames 1 with start frames failed every validation with `num_cond_latents=1 must leave
    at least one of the 1 frames to denoise` (no key named)."""
    code, _, err = check(write_config(tmp_path, workspace, validation_num_video_frames=1), capsys)
    assert code == 1
    assert "validation_num_video_frames 1: image-to-video validation needs at least 5 frames" in err
    code, _, err = check(write_config(tmp_path / "t2v", workspace, validation_num_video_frames=1,
                                      validation_using_datasets=False, validation_resolution="32x32"), capsys)
    assert code == 0, err  # text-to-video validation has no start frame to keep


def test_bucket_sizes_the_checkpoints_patch_cannot_take_are_named(tmp_path):
    """Before: with a DiT of patch_size (1, 4, 4), 48-pixel buckets (multiples of 16, the release's rule) passed
    `check` and the cache stage, then stopped the run at its first step."""
    from longcat_tuner.commands.check import patch_problem
    from longcat_tuner.config.datasets import load_datasets
    from longcat_tuner.data.backends import plan_data
    from longcat_tuner.model.config import DiTConfig

    workspace = write_paired_workspace(tmp_path / "data", train_clips=1, eval_clips=1, frames=5, size=48)
    plan = plan_data(load_datasets(workspace / "multidatabackend.json"), eval_dataset_id="val", alignment=16, seed=0)
    heights = {s.bucket.height for p in plan.train for s in p.samples}
    assert heights and all(h % 32 for h in heights)  # the case: 16-aligned, not 32-aligned
    model = tmp_path / "model"
    for patch, expected in (((1, 2, 2), None), ((1, 4, 4), "not multiples of 32x32")):
        (model / "dit").mkdir(parents=True, exist_ok=True)
        config = DiTConfig(depth=1, hidden_size=64, num_heads=2, patch_size=patch)
        (model / "dit" / "config.json").write_text(json.dumps(config.to_dict()))
        problem = patch_problem(plan, model)
        assert (problem is None) if expected is None else (expected in problem and "'train'" in problem), problem


def test_text_to_video_eval_samples_with_a_resolution_class_are_refused_by_check(tmp_path, workspace, capsys):
    """An eval split without start frames and `validation_resolution: 480p` passed check; train then stopped after
    loading the model ("eval sample ... has no start frame, so validation_resolution must be HEIGHTxWIDTH")."""
    datasets = [d for d in json.loads((workspace / "multidatabackend.json").read_text()) if d["id"] != "val-cond"]
    for entry in datasets:
        if entry["id"] == "val":
            entry.pop("conditioning_data", None)
            entry["is_i2v"] = False
    (tmp_path / "multidatabackend.json").write_text(json.dumps(datasets))
    backend = str(tmp_path / "multidatabackend.json")
    code, _, err = check(write_config(tmp_path, workspace, data_backend_config=backend, validation_resolution="32p"), capsys)
    assert code == 1 and "has no start frame, so validation_resolution must be HEIGHTxWIDTH" in err, err
    code, _, err = check(write_config(tmp_path / "b", workspace, data_backend_config=backend,
                                      validation_resolution="32x32"), capsys)
    assert code == 0, err
