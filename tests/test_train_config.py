"""config.json schema: the guide's keys, defaults, errors that name the key, and the generated CLI help."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from longcat_tuner.config import TrainConfig
from longcat_tuner.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO.parent / "shared" / "seed" / "000_fe2af4613b1ea2b9.txt"


def guide_config() -> dict:
    """The jsonc block of the guide's section 2, as a dict."""
    if not GUIDE.is_file():
        pytest.skip(f"the quick-start guide is not at {GUIDE}")
    text = GUIDE.read_text(encoding="utf-8")
    section = text[text.index("## 2)") :]
    block = re.search(r"```jsonc\n(.*?)```", section, re.S).group(1)
    return json.loads(block)


def test_guide_config_validates_with_paths_filled(tmp_path):
    data = guide_config()
    data.update(pretrained_model_name_or_path="model", output_dir="out", data_backend_config="multidatabackend.json")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    config = TrainConfig.from_file(path)
    assert config.lora_rank == 8 and config.validation_num_inference_steps == 40
    assert config.flow_schedule_shift == 12.0 and config.aspect_bucket_alignment == 64
    assert config.lora_targets == [
        "attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
        "ffn.w1", "ffn.w2", "ffn.w3",
    ]
    # Relative paths resolve against the config file's folder, not the working directory.
    assert config.output_dir == tmp_path / "out"
    assert config.data_backend_config == tmp_path / "multidatabackend.json"


def test_example_file_holds_the_guide_keys():
    example = json.loads((REPO / "config" / "config.json.example").read_text())
    for key, value in guide_config().items():
        assert example[key] == value, key
    TrainConfig.from_dict(example)


def test_unknown_key_is_named_with_a_hint():
    with pytest.raises(ConfigError, match=r"'lora_rnak' \(did you mean 'lora_rank'\?\)"):
        TrainConfig.from_dict({"pretrained_model_name_or_path": "m", "output_dir": "o",
                               "data_backend_config": "d", "lora_rnak": 4})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("validation_num_video_frames", 92, "use 89 or 93"),
        ("aspect_bucket_alignment", 40, "multiple of 16"),
        ("validation_resolution", "480x830", "divisible by 16"),
        ("model_type", "dora", "model_type"),
        ("eval_dataset_id", None, "eval_dataset_id is empty"),
        ("compile_scope", "checkpointed_block", "needs compile_blocks: true"),
        ("compile_scope", "graph", "compile_scope"),
    ],
)
def test_bad_values_name_the_key(key, value, message):
    data = {"pretrained_model_name_or_path": "m", "output_dir": "o", "data_backend_config": "d", key: value}
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(data)


def test_text_to_video_validation_needs_an_exact_size():
    """`check` passed `validation_resolution: 64p` with prompt-only validation; `train` then stopped after loading
    the model (a class is sized from a start frame's aspect, and a prompt has none)."""
    base = {"pretrained_model_name_or_path": "m", "output_dir": "o", "data_backend_config": "d",
            "validation_using_datasets": False, "eval_dataset_id": None, "validation_prompt": "a cat"}
    with pytest.raises(ConfigError, match="needs validation_resolution as HEIGHTxWIDTH .* got '64p'"):
        TrainConfig.from_dict({**base, "validation_resolution": "64p"})
    assert TrainConfig.from_dict({**base, "validation_resolution": "64x128"}).validation_resolution == "64x128"
    TrainConfig.from_dict({**base, "validation_prompt": None, "validation_resolution": "64p"})  # no validation


def test_missing_path_says_to_add_it():
    with pytest.raises(ConfigError, match="output_dir: required"):
        TrainConfig.from_dict({"pretrained_model_name_or_path": "m", "data_backend_config": "d"})


@pytest.mark.parametrize("key", ["output_dir", "pretrained_model_name_or_path", "init_lora"])
@pytest.mark.parametrize("value, shown", [(True, "true"), (5, "5"), (["a", "b"], '["a", "b"]')])
def test_a_path_key_that_is_not_a_string_is_refused_not_made_a_folder_name(tmp_path, key, value, shown):
    # `"output_dir": true` used to pass `check` and `train` wrote into a folder named `True`.
    data = {"pretrained_model_name_or_path": "m", "output_dir": "o", "data_backend_config": "d.json", key: value}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=re.escape(f"{key}: expected a path (a string), not {shown}")):
        TrainConfig.from_file(path)


def test_jsonc_comments_and_cli_overrides(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n // comment\n "pretrained_model_name_or_path": "http://x//y", /* c */ "output_dir": "o",\n'
                    ' "data_backend_config": "d.json"}')
    config = TrainConfig.from_file(path, overrides={"lora_rank": 16})
    assert config.lora_rank == 16 and str(config.pretrained_model_name_or_path).endswith("http:/x/y")


def test_a_bad_flag_value_is_named_as_the_flag_not_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"pretrained_model_name_or_path": "m", "output_dir": "o", "data_backend_config": "d.json",'
                    ' "lora_rank": 8, "learning_rate": -1}')
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_file(path, overrides={"lora_rank": 0})
    message = str(caught.value)
    assert "--lora_rank (command line)" in message and "(got 0)" in message
    # the file's own bad value is still named as the file's key
    assert "learning_rate:" in message and "--learning_rate" not in message


def test_every_field_is_described_and_in_train_help():
    for name, field in TrainConfig.model_fields.items():
        assert field.description, f"{name} has no description"
    out = subprocess.run(
        [sys.executable, "-m", "longcat_tuner.cli", "train", "--help"], capture_output=True, text=True,
        cwd=REPO, env={**os.environ, "COLUMNS": "200",
                       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
    )
    assert out.returncode == 0, out.stderr
    for name in TrainConfig.model_fields:
        assert f"--{name}" in out.stdout, name


def test_cli_options_override_the_file(tmp_path):
    import argparse

    from longcat_tuner.config import add_config_arguments, config_overrides

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--lora_rank", "4", "--no-gradient_checkpointing", "--lora_targets", "attn.qkv",
                              "--max_train_steps", "none", "--num_train_epochs", "2"])
    assert config_overrides(args) == {"lora_rank": 4, "gradient_checkpointing": False, "lora_targets": ["attn.qkv"],
                                      "max_train_steps": None, "num_train_epochs": 2}


def test_epochs_give_the_step_count_and_group_offload_is_refused():
    from longcat_tuner.train.trainer import build_model, choose_precision, total_optimizer_steps

    base = {"pretrained_model_name_or_path": "m", "output_dir": "o", "data_backend_config": "d"}
    config = TrainConfig.from_dict({**base, "max_train_steps": None, "num_train_epochs": 3,
                                    "gradient_accumulation_steps": 2})
    assert total_optimizer_steps(config, batches_per_epoch=5) == 8  # ceil(3 * 5 / 2)
    assert total_optimizer_steps(TrainConfig.from_dict(base), batches_per_epoch=5) == 1000
    config = TrainConfig.from_dict({**base, "enable_group_offload": True})
    with pytest.raises(ConfigError, match="musubi_blocks_to_swap"):
        build_model(config, choose_precision(config))


def test_checkpointed_block_compile_scope_with_keep_attention():
    config = TrainConfig.from_dict({"pretrained_model_name_or_path": "m", "output_dir": "o", "data_backend_config": "d",
                                    "compile_blocks": True, "gradient_checkpointing_mode": "keep_attention",
                                    "compile_scope": "checkpointed_block"})
    assert config.compile_scope == "checkpointed_block"


def test_the_frame_count_hint_says_what_image_to_video_needs():
    """`sample --image --frames 3` suggested "use 1 or 5", and 1 is then refused for image-to-video."""
    from longcat_tuner.config.sampling import causal_frame_count_error

    assert causal_frame_count_error(3).endswith("use 1 or 5; image-to-video needs 5 or more")
    assert causal_frame_count_error(7).endswith("use 5 or 9")
    assert causal_frame_count_error(9) is None


def test_null_and_a_string_for_a_list_say_what_to_write():
    """`output_dir: null` said "Input is not a valid path for <class 'pathlib.Path'>"; a string where a list goes
    did not say how to write the list."""
    from longcat_tuner.config.datasets import parse_datasets

    with pytest.raises(ConfigError, match=r"output_dir: null is not allowed here; give a path \(got None\)"):
        TrainConfig.from_dict({"pretrained_model_name_or_path": "m", "output_dir": None, "data_backend_config": "d"})
    entries = [{"id": "train", "dataset_type": "video", "is_i2v": True, "instance_data_dir": "clips",
                "resolution": "32x32", "cache_dir_vae": "c", "conditioning_data": "train-cond"}]
    with pytest.raises(ConfigError, match=r"conditioning_data': .*write it as a list: \[\"train-cond\"\]"):
        parse_datasets(entries)


def test_a_prompt_the_size_of_a_pasted_file_is_refused():
    """A 60 MB validation_prompt was accepted (the web UI wrote it into config.json); the encoder reads 512 tokens."""
    from longcat_tuner.config.sampling import MAX_CONFIG_PROMPT_CHARS

    base = {"pretrained_model_name_or_path": "m", "output_dir": "o", "data_backend_config": "d"}
    for key in ("validation_prompt", "validation_negative_prompt"):
        with pytest.raises(ConfigError, match=f"{key}: String should have at most {MAX_CONFIG_PROMPT_CHARS} characters"):
            TrainConfig.from_dict({**base, key: "x" * (MAX_CONFIG_PROMPT_CHARS + 1)})
        TrainConfig.from_dict({**base, key: "a cat " * 1000})  # a long but real prompt


def test_a_long_bad_value_is_not_echoed_whole():
    from longcat_tuner.config.sampling import MAX_CONFIG_PROMPT_CHARS

    base = {"pretrained_model_name_or_path": "m", "output_dir": "o", "data_backend_config": "d"}
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({**base, "validation_prompt": "x" * (MAX_CONFIG_PROMPT_CHARS + 1)})
    assert len(str(err.value)) < 400 and f"({MAX_CONFIG_PROMPT_CHARS + 3} characters)" in str(err.value)
