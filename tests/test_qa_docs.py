"""README and --help against the program (QA pass on the docs): the commands, flags and keys the README shows exist,
and the fixes of that pass (`plan` sizes what is not given from the training data; help texts that said otherwise)."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from longcat_tuner.cli import build_parser, main as cli_main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def readme_text() -> str:
    # Shell continuations joined, so `longcat-tuner sample --model X \` + `--image ...` is one command.
    return re.sub(r"\\\n\s*", " ", README.read_text(encoding="utf-8"))


FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")


def test_readme_commands_use_existing_subcommands_and_flags():
    """Every `longcat-tuner SUB --flag ...` of the README (code blocks and prose) and every inline `SUB --flag`
    names a subcommand that exists and flags its parser has."""
    parsers = subcommand_parsers()
    text = readme_text()
    problems, seen = [], 0
    for match in re.finditer(r"longcat-tuner ([a-z][a-z-]*)([^`\n|]*)", text):
        sub, rest = match.group(1), match.group(2)
        if sub not in parsers:
            # prose such as "puts longcat-tuner on PATH" or "longcat-tuner web UI: http://..." (the server's banner)
            if sub in ("on", "web", "includes", "itself", "runs", "is"):
                continue
            problems.append(f"unknown subcommand `longcat-tuner {sub}` in: {match.group(0)[:80]}")
            continue
        for flag in FLAG.findall(rest):
            seen += 1
            if flag not in option_strings(parsers[sub]):
                problems.append(f"`longcat-tuner {sub}` has no {flag} (README: {match.group(0)[:100]})")
    inline = re.compile(r"`(sample|check|cache|train|plan|demo|export-lora|server)((?:\s+--?[\w-]+(?:\s+[^\s`-][^\s`]*)?)+)`")
    for match in inline.finditer(text):
        sub = match.group(1)
        for flag in FLAG.findall(match.group(2)):
            seen += 1
            if flag not in option_strings(parsers[sub]):
                problems.append(f"`{sub}` has no {flag} (README: {match.group(0)[:100]})")
    assert seen > 40, "the README's command examples were not found; update this test's patterns"
    assert not problems, "\n".join(problems)


def test_readme_sample_row_lists_real_flags_and_defaults():
    """The `longcat-tuner sample` row of the command table: its flags exist and its `[--flag DEFAULT]` values are
    the parser's defaults."""
    text = README.read_text(encoding="utf-8")
    row = re.search(r"^\| `longcat-tuner sample` \|(.*)$", text, re.M).group(1)
    sample = subcommand_parsers()["sample"]
    actions = {flag: action for action in sample._actions for flag in action.option_strings}
    for flag in set(FLAG.findall(row)):
        assert flag in actions, f"sample has no {flag}"
    checked = 0
    for flag, value in re.findall(r"\[(--[\w-]+) ([\w.]+)\]", row):
        default = actions[flag].default
        if value.isupper() or default is None:  # a placeholder (DIT_FOLDER, N, G), not a default
            continue
        checked += 1
        assert str(default) == value or (isinstance(default, float) and float(value) == default), (flag, value, default)
    assert checked >= 6  # frames, steps, guidance, shift, seed, fps


def test_readme_key_tables_name_schema_keys():
    """The key tables ("Keys of a dataset entry", "Main keys") name keys the schemas have, with their defaults
    where the table gives a plain value."""
    from longcat_tuner.config.datasets import DatasetConfig, VideoSettings
    from longcat_tuner.config.training import TrainConfig

    text = README.read_text(encoding="utf-8")
    dataset_keys = set(DatasetConfig.model_fields) | {f"video.{k}" for k in VideoSettings.model_fields}
    table = text.split("### Keys of a dataset entry", 1)[1].split("\n\n", 2)[1]
    for key, default in re.findall(r"^\| `([\w.]+)`(?: / `\w+`)? \| `?([^|`]*?)`? \|", table, re.M):
        assert key in dataset_keys, f"dataset key {key} is not in the schema"
        if key.startswith("video."):
            field = VideoSettings.model_fields[key.split(".", 1)[1]]
        else:
            field = DatasetConfig.model_fields[key]
        if re.fullmatch(r"-?\d+(\.\d+)?|true|false|local|textfile", default):
            expected = field.get_default(call_default_factory=True)
            assert str(expected).lower() == default or float(default) == expected, (key, default, expected)
    main = text.split("### Main keys", 1)[1].split("\n\n", 1)[0]
    for cell in re.findall(r"^\| ([^|]+) \|", main, re.M):
        for key in re.findall(r"`(\w+)`", cell):
            assert key in TrainConfig.model_fields, f"config key {key} is not in the schema"


def test_readme_python_api_backends_are_registered():
    from longcat_tuner.model import attention

    text = README.read_text(encoding="utf-8")
    row = re.search(r"^\| `dit.set_attention_backend\(name\)` \|(.*)$", text, re.M).group(1)
    named = set(re.findall(r"`(\w+)`", row))
    assert named == set(attention._BACKENDS) | {"auto"}


# --- `plan`: what is not given comes from the training data -----------------------------------------------------

def write_plan_config(tmp_path: Path) -> Path:
    # Training clips of 93 frames at 480 (480x832 at 16:9); validation set smaller, so a fallback to it shows.
    datasets = [
        {"id": "clips", "dataset_type": "video", "is_i2v": True, "instance_data_dir": str(tmp_path / "clips"),
         "cache_dir_vae": str(tmp_path / "cache" / "clips"), "conditioning_data": ["starts"],
         "resolution": 480, "video": {"num_frames": 93}},
        {"id": "starts", "dataset_type": "conditioning", "instance_data_dir": str(tmp_path / "starts"),
         "caption_strategy": None, "cache_dir_vae": str(tmp_path / "cache" / "starts")},
    ]
    (tmp_path / "multidatabackend.json").write_text(json.dumps(datasets))
    config = {
        "pretrained_model_name_or_path": str(tmp_path / "no-model"), "output_dir": str(tmp_path / "out"),
        "data_backend_config": "multidatabackend.json", "eval_dataset_id": None, "validation_using_datasets": False,
        "validation_resolution": "320x576", "validation_num_video_frames": 45,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def plan_setting_line(capsys, config: Path, *extra: str) -> str:
    assert cli_main(["plan", "--config", str(config), *extra]) == 0
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("setting:"))


@pytest.mark.parametrize("extra, expected", [
    ((), "setting: 480x832, 93 frames"),
    (("--resolution", "480x832"), "setting: 480x832, 93 frames"),  # took validation's 45 frames before
    (("--frames", "45"), "setting: 480x832, 45 frames"),  # took validation's 320x576 before
    (("--resolution", "320x576", "--frames", "45"), "setting: 320x576, 45 frames"),
])
def test_plan_takes_what_is_not_given_from_the_training_data(tmp_path, capsys, extra, expected):
    assert plan_setting_line(capsys, write_plan_config(tmp_path), *extra).startswith(expected)


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        cli_main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_plan_help_names_no_default_it_does_not_use(capsys):
    text = help_text(capsys, "plan")
    assert "[default: 480p]" not in text and "[default: 93]" not in text
    assert "Default: the largest training dataset" in text
    assert "memory plan `train` would choose" in text
    # `sample` still shows its own defaults, which it uses
    sample = help_text(capsys, "sample")
    assert "[default: 480p]" in sample and "[default: 93]" in sample


@pytest.mark.parametrize("command", ["check", "cache"])
def test_check_and_cache_help_say_where_the_eval_split_comes_from(capsys, command):
    assert "Without --config, no dataset is held out as the eval split unless --eval_dataset_id names it" in \
        help_text(capsys, command)


def test_demo_help_says_what_a_rerun_refuses(capsys):
    text = help_text(capsys, "demo")
    assert "is refused, never replaced" in text


# --- overwrite_output_dir sets the demo's chart aside with the run it belongs to --------------------------------

def test_overwrite_moves_the_demo_loss_chart_with_the_earlier_run(tmp_path):
    from longcat_tuner.train.outputs import set_aside_earlier_run

    (tmp_path / "events.jsonl").write_text("{}\n")
    (tmp_path / "loss.png").write_bytes(b"\x89PNG earlier run")
    (tmp_path / "notes.txt").write_text("mine")
    aside = set_aside_earlier_run(tmp_path)
    assert aside is not None and (aside / "loss.png").read_bytes() == b"\x89PNG earlier run"
    assert not (tmp_path / "loss.png").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # files that are not a run's stay
