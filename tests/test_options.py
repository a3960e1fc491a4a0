"""Options declared once: the sampling section feeds `sample`'s flags, the web preview, the validation keys;
one resolution parser; one dtype rule; light commands import no torch; modules import in one direction."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

import pytest

from longcat_tuner.config.resolution import parse_resolution
from longcat_tuner.config.sampling import SAMPLING_DEFAULTS, SamplingOptions, add_sampling_arguments
from longcat_tuner.config.training import TrainConfig


def sample_parser() -> argparse.ArgumentParser:
    from longcat_tuner.commands import sample

    parser = argparse.ArgumentParser()
    sample.register(parser.add_subparsers())
    return parser


def test_sample_flags_come_from_the_sampling_section():
    args = sample_parser().parse_args(["sample", "--model", "m", "--prompt", "p", "--output", "o.mp4"])
    for name, field in SamplingOptions.model_fields.items():
        assert getattr(args, name) == field.default, name
    assert (args.steps, args.seed) == (50, 42)  # the official step count; one seed default everywhere
    parser = sample_parser()
    (subparsers,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    help_text = " ".join(subparsers.choices["sample"].format_help().split())
    assert SamplingOptions.model_fields["guidance"].description.split(";")[0] in help_text  # the schema's help


def test_sample_flags_are_checked_by_the_schema(capsys):
    parser = sample_parser()
    base = ["sample", "--model", "m", "--prompt", "p", "--output", "o.mp4"]
    for flag, value, message in [
        ("--frames", "94", "(frames - 1) must be divisible by 4"),
        ("--steps", "0", "1 <= steps <= 1000"),
        ("--resolution", "481p", "not a multiple of 16"),
        ("--guidance", "0.5", "1 <= guidance <= 50"),
        ("--seed", "x", "'x' is not a whole number"),
    ]:
        with pytest.raises(SystemExit):
            parser.parse_args(base + [flag, value])
        assert message in capsys.readouterr().err, flag


def test_validation_keys_share_the_sampling_rules():
    fields = TrainConfig.model_fields
    assert fields["validation_num_inference_steps"].default == 40  # the guide's validation default
    for key, name in [("validation_num_inference_steps", "steps"), ("validation_guidance", "guidance"),
                      ("validation_seed", "seed"), ("validation_num_video_frames", "frames")]:
        assert fields[key].metadata == SamplingOptions.model_fields[name].metadata, key
    from longcat_tuner.errors import ConfigError

    with pytest.raises(ConfigError, match="94 frames: \\(frames - 1\\) must be divisible by 4"):
        TrainConfig.from_dict({"pretrained_model_name_or_path": "m", "data_backend_config": "d", "output_dir": "o",
                               "validation_num_video_frames": 94})
    with pytest.raises(ConfigError, match="validation_resolution: 481 is not a multiple of 16"):
        TrainConfig.from_dict({"pretrained_model_name_or_path": "m", "data_backend_config": "d", "output_dir": "o",
                               "validation_resolution": "481p"})


def test_web_preview_defaults_are_the_sampling_section(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from longcat_tuner.server.app import ServerSettings, create_app
    from longcat_tuner.server.routes.previews import PreviewBody

    body = PreviewBody(upload="u", prompt="p")
    for name in ("frames", "steps", "guidance", "resolution", "seed"):
        assert getattr(body, name) == getattr(SAMPLING_DEFAULTS, name), name
    settings = ServerSettings(token="t", data_dir=tmp_path / "data", cwd=tmp_path)
    client = TestClient(create_app(settings), base_url="http://127.0.0.1:8765")
    schema = client.get("/api/schema", headers={"Authorization": "Bearer t"}).json()
    assert schema["sampling"]["properties"]["steps"]["default"] == SAMPLING_DEFAULTS.steps
    # The page holds no defaults of its own: its script fills the form from this schema.
    from importlib import resources

    page = resources.files("longcat_tuner.server").joinpath("static/index.html").read_text()
    for key in ("steps", "seed", "frames", "guidance", "resolution"):
        tag = page[page.index(f'id="preview-{key}"'):]
        assert "value=" not in tag[: tag.index(">")], key


@pytest.mark.parametrize("bad", ["99999x99999", "99999x832", "480x8192", "0x832"])
def test_a_size_out_of_range_names_the_limit_too(bad):
    # Before: `99999x99999` only said "divisible by 16" (99999 is not), not that sides stop at 4096.
    with pytest.raises(ValueError, match=r"divisible by 16 and lie in 16\.\.4096"):
        parse_resolution(bad)


def test_one_resolution_parser():
    assert parse_resolution("480x832") == (480, 832)
    assert parse_resolution("480p") == parse_resolution("480") == parse_resolution(480) == 480
    for bad, message in [("480x830", "divisible by 16"), ("481p", "multiple of 16"), ("big", "neither"),
                         (True, "expected a size")]:
        with pytest.raises(ValueError, match=message):
            parse_resolution(bad)
    from longcat_tuner.config.datasets import DatasetConfig
    from longcat_tuner.data.buckets import resolution_size

    # The dataset key and the validation key accept the same forms through it.
    assert DatasetConfig(id="a", dataset_type="video", instance_data_dir="x", cache_dir_vae="c", resolution="720p")
    assert resolution_size("480p") == (480, 832)
    assert resolution_size("480p", (1000, 1000)) == (608, 640)
    assert resolution_size("480p", (1920, 1080)) == (832, 480)


def test_plan_follows_the_aspect_of_a_named_class(tmp_path):
    from longcat_tuner.commands.plan import clip_size

    assert clip_size("480p") == (480, 832)
    assert clip_size("720p") == (720, 1280)
    assert clip_size("608x640") == (608, 640)
    assert clip_size(480, aspect=(1, 1)) == (608, 640)  # a square dataset's 480 is 608x640, not 480x832


def test_one_dtype_rule():
    import torch

    from longcat_tuner.devices import default_dtype

    assert default_dtype("cpu") is torch.float32
    assert default_dtype(torch.device("cuda", 0)) is torch.bfloat16


def test_planner_setting_uses_the_schema_lora_rank():
    from longcat_tuner.runtime.planner import Setting

    assert Setting(height=480, width=832, frames=93).lora_rank == TrainConfig.model_fields["lora_rank"].default


LIGHT_IMPORTS = textwrap.dedent("""
    import contextlib, io, json, sys
    from longcat_tuner.cli import main
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(sys.argv[1:])
    print(json.dumps(sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))))
""")


def torch_modules_after(*argv: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", LIGHT_IMPORTS, *argv], capture_output=True, text=True, timeout=120)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [("--help",), ("check", "--help"), ("plan", "--help"), ("export-lora", "--help"),
                                  ("sample", "--help"), ("train", "--help")])
def test_help_imports_no_torch(argv):
    assert torch_modules_after(*argv) == []


def test_check_imports_no_torch(tmp_path):
    from tests.conftest import write_paired_workspace

    write_paired_workspace(tmp_path, train_clips=2, eval_clips=1, frames=5, size=32)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"pretrained_model_name_or_path": "model", "data_backend_config": "multidatabackend.json",
                                  "output_dir": "out", "eval_dataset_id": "val"}))
    assert torch_modules_after("check", "--config", str(config), "--data-only") == []


def test_media_and_data_import_in_one_direction():
    """`data` never imports `media` (media is the torch side and imports data); `model.lora` reads no training config."""
    import ast
    from pathlib import Path

    import longcat_tuner

    root = Path(longcat_tuner.__file__).parent

    def imported(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        return names

    for path in (root / "data").glob("*.py"):
        assert "longcat_tuner.media" not in imported(path), path
    for path in (root / "model" / "lora.py", root / "model" / "lora_formats.py"):
        assert not any(name.startswith("longcat_tuner.config") for name in imported(path)), path
