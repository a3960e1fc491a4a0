"""Path keys as written by hand: `$VAR` / `${VAR}` expanded (an unset one refused), Windows paths refused on POSIX,
and `check` refusing an `init_lora` that `train` would refuse (another model's size, modules outside lora_targets)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from longcat_tuner.cli import main as cli_main
from longcat_tuner.config.datasets import load_datasets
from longcat_tuner.config.training import TrainConfig
from longcat_tuner.errors import ConfigError
from tests.conftest import TINY, write_paired_workspace

posix_only = pytest.mark.skipif(os.name != "posix", reason="Windows paths are refused on POSIX systems only")


def write_config(folder: Path, **keys) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps({"pretrained_model_name_or_path": "/models/longcat", "output_dir": "out",
                                "data_backend_config": "multidatabackend.json", **keys}))
    return path


def write_datasets(folder: Path, **keys) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "multidatabackend.json"
    path.write_text(json.dumps([{"id": "clips", "dataset_type": "video", "instance_data_dir": "clips",
                                 "cache_dir_vae": "cache", **keys}]))
    return path


# --- 1: environment variables -----------------------------------------------------------------------------
def test_environment_variables_in_path_keys_are_expanded(tmp_path, monkeypatch):
    # "$HOME/x" became a folder literally named `$HOME` inside the config's folder.
    monkeypatch.setenv("LCT_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = TrainConfig.from_file(write_config(
        tmp_path / "cfg", output_dir="$LCT_ROOT/run", pretrained_model_name_or_path="${LCT_ROOT}/model",
        data_backend_config="~/db.json", init_lora="$HOME/start.safetensors"))
    assert config.output_dir == tmp_path / "root" / "run"
    assert config.pretrained_model_name_or_path == tmp_path / "root" / "model"
    assert config.data_backend_config == tmp_path / "home" / "db.json"  # `~` as before
    assert Path(config.init_lora) == tmp_path / "home" / "start.safetensors"
    datasets = load_datasets(write_datasets(tmp_path / "cfg", instance_data_dir="${LCT_ROOT}/clips",
                                            cache_dir_vae="$LCT_ROOT/cache", cache_dir_text="~/text"))
    (dataset,) = datasets.datasets
    assert dataset.instance_data_dir == tmp_path / "root" / "clips"
    assert dataset.cache_dir_vae == tmp_path / "root" / "cache"
    assert dataset.cache_dir_text == tmp_path / "home" / "text"


def test_an_unset_variable_is_refused_naming_the_key_the_variable_and_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LCT_UNSET", raising=False)
    path = write_config(tmp_path, output_dir="${LCT_UNSET}/run")
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_file(path)
    assert str(err.value).startswith(f"{path}: output_dir: environment variable ${{LCT_UNSET}} is not set; "
                                     "set it or write the path out")
    assert cli_main(["check", "--config", str(path)]) == 2  # a user error, one line, no traceback
    assert "output_dir: environment variable ${LCT_UNSET} is not set" in capsys.readouterr().err
    datasets = write_datasets(tmp_path, cache_dir_vae="$LCT_UNSET/cache")
    with pytest.raises(ConfigError, match=r"dataset 'clips' \(entry 0\): key 'cache_dir_vae': environment variable "
                                          r"\$LCT_UNSET is not set; set it or write the path out"):
        load_datasets(datasets)
    assert not (tmp_path / "$LCT_UNSET").exists()


# --- 2: Windows paths on POSIX ------------------------------------------------------------------------------
@posix_only
@pytest.mark.parametrize("written, example", [
    ("C:\\Users\\me\\out", "e.g. /mnt/c/Users/me/out under WSL"),
    ("D:/data", "e.g. /mnt/d/data under WSL"),
    ("\\\\server\\share\\x", "the folder where the share is mounted"),
])
def test_a_windows_path_is_refused_on_posix(tmp_path, written, example):
    path = write_config(tmp_path, output_dir=written)
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_file(path)
    message = str(err.value)
    assert message.startswith(f"{path}: output_dir: this is a Windows path") and example in message
    assert "give the path as this machine sees it" in message
    with pytest.raises(ConfigError, match=r"key 'instance_data_dir': this is a Windows path"):
        load_datasets(write_datasets(tmp_path, instance_data_dir=written))


@posix_only
def test_posix_names_holding_a_backslash_are_kept(tmp_path):
    config = TrainConfig.from_file(write_config(tmp_path, output_dir="runs\\C:\\x", init_lora="a\\b.safetensors"))
    assert config.output_dir == tmp_path / "runs\\C:\\x"
    assert Path(config.init_lora) == tmp_path / "a\\b.safetensors"


# --- 1 and 2 in the web UI: the same validator, one error per key ------------------------------------------
@posix_only
def test_the_web_ui_refuses_the_same_paths_once_each(tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    from longcat_tuner.server.configfiles import ConfigBody, validate_files
    from longcat_tuner.server.settings import ServerSettings

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("LCT_WORK", str(work))
    monkeypatch.delenv("LCT_UNSET", raising=False)
    settings = ServerSettings(token="t", data_dir=tmp_path / "data", allowed_roots=(work,), cwd=work)
    body = ConfigBody(
        config={"pretrained_model_name_or_path": "$LCT_WORK/model", "output_dir": "$LCT_UNSET/out",
                "max_train_steps": 2, "validation_using_datasets": False},
        datasets=[{"id": "clips", "dataset_type": "video", "instance_data_dir": "C:\\clips",
                   "cache_dir_vae": "${LCT_WORK}/cache"}],
    )
    config, datasets, errors = validate_files(settings, body)
    assert config["pretrained_model_name_or_path"] == str(work / "model")
    assert datasets[0]["cache_dir_vae"] == str(work / "cache")
    assert [(e["loc"], e["msg"].split(";")[0]) for e in errors] == [
        (["config", "output_dir"], "environment variable $LCT_UNSET is not set"),
        (["datasets", "0", "instance_data_dir"],
         f"this is a Windows path, which this {sys.platform} machine would take as a relative folder name"),
    ]


# --- 3: `check` refuses the init_lora `train` would refuse -------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    if not TINY.is_dir():
        pytest.skip(f"the tiny checkpoint is not at {TINY}")
    return write_paired_workspace(tmp_path_factory.mktemp("paths"), train_clips=1, eval_clips=1, frames=5, size=32)


def lora_file(path: Path, module: str, in_features: int, out_features: int, rank: int = 4) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({f"diffusion_model.{module}.lora_down.weight": torch.zeros(rank, in_features),
               f"diffusion_model.{module}.lora_up.weight": torch.zeros(out_features, rank)}, str(path))
    return path


def run_check(folder: Path, workspace: Path, capsys, *extra: str, **keys) -> tuple[int, str]:
    folder.mkdir(exist_ok=True)
    config = folder / "config.json"
    config.write_text(json.dumps({
        "pretrained_model_name_or_path": str(TINY), "output_dir": str(folder / "out"),
        "data_backend_config": str(workspace / "multidatabackend.json"), "eval_dataset_id": "val",
        "validation_resolution": "32x32", "validation_num_video_frames": 5, **keys,
    }))
    code = cli_main(["check", "--config", str(config), *extra])
    return code, capsys.readouterr().err


def test_check_refuses_an_init_lora_of_another_size_or_outside_lora_targets(tmp_path, workspace, capsys):
    # `check` read the header only and said ok; `train` then refused the file (the tiny DiT: hidden 256, ffn 768).
    good = lora_file(tmp_path / "good.safetensors", "blocks.0.attn.proj", 256, 256)
    code, err = run_check(tmp_path / "good", workspace, capsys, init_lora=str(good))
    assert code == 0, err
    bigger = lora_file(tmp_path / "bigger.safetensors", "blocks.0.attn.proj", 512, 512)  # a model of hidden 512
    code, err = run_check(tmp_path / "bigger", workspace, capsys, init_lora=str(bigger))
    assert code == 1
    assert f"error: init_lora: {bigger}: LoRA shapes for 'blocks.0.attn.proj' (down (4, 512)" in err
    assert "do not fit the layer [256, 256]; is this a LoRA for another model or another size of it?" in err
    deeper = lora_file(tmp_path / "deeper.safetensors", "blocks.7.attn.proj", 256, 256)  # a model of 8+ blocks
    code, err = run_check(tmp_path / "deeper", workspace, capsys, init_lora=str(deeper))
    assert code == 1 and "LoRA modules are not linear layers of this DiT (blocks.7.attn.proj)" in err
    ffn = lora_file(tmp_path / "ffn.safetensors", "blocks.0.ffn.w1", 256, 768)
    for extra in ((), ("--data-only",)):  # lora_targets needs no model folder
        code, err = run_check(tmp_path / "ffn", workspace, capsys, *extra, init_lora=str(ffn), lora_targets=["attn.qkv"])
        assert code == 1
        assert (f"error: init_lora: {ffn}: 1 LoRA modules have no trainable adapter here (blocks.0.ffn.w1); add their "
                "layers to lora_targets, or use a LoRA trained for this model") in err
