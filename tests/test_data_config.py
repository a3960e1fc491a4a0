"""multidatabackend.json schema: the guide's example, the shipped example, and errors that name the fix."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from longcat_tuner.config.datasets import load_datasets, parse_datasets
from longcat_tuner.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GUIDE = SHARED / "seed" / "000_fe2af4613b1ea2b9.txt"


def guide_example() -> list:
    if not GUIDE.is_file():
        pytest.skip(f"the guide is not at {GUIDE} (needs ../shared next to the repo)")
    text = GUIDE.read_text(encoding="utf-8")
    blocks = re.findall(r"```jsonc\n(.*?)```", text, flags=re.S)
    lists = [json.loads(block) for block in blocks if block.lstrip().startswith("[")]
    assert lists, "the guide's multidatabackend.json example was not found"
    return lists[0]


def test_guide_example_validates_as_is():
    datasets = parse_datasets(guide_example())
    train, cond = datasets.datasets
    assert (train.id, train.is_i2v, train.conditioning_data) == ("longcat-video-train", True, ["longcat-video-cond"])
    assert cond.dataset_type == "conditioning" and cond.caption_strategy is None
    # Defaults that match the guide: 93 frames at 15 fps, 480p area, center crop.
    assert (train.video.num_frames, train.video.fps, train.resolution, train.crop_style) == (93, 15.0, 480, "center")
    assert train.text_cache_dir == Path("/cache/vae/longcat/text")
    assert datasets.split(None)[0] == [train]


def test_shipped_example_validates_and_has_the_eval_split():
    datasets = load_datasets(REPO / "config" / "multidatabackend.json.example")
    train, eval_split = datasets.split("longcat-video-val")
    assert [d.id for d in train] == ["longcat-video-train"]
    assert eval_split.id == "longcat-video-val" and eval_split.conditioning_data == ["longcat-video-val-cond"]


def _with(change: dict, index: int = 0) -> list:
    data = [
        {"id": "clips", "dataset_type": "video", "is_i2v": True, "instance_data_dir": "/d/c", "cache_dir_vae": "/c/v",
         "conditioning_data": ["starts"]},
        {"id": "starts", "dataset_type": "conditioning", "instance_data_dir": "/d/s", "caption_strategy": None,
         "cache_dir_vae": "/c/s"},
    ]
    data[index].update(change)
    return data


@pytest.mark.parametrize(
    "change, index, expected",
    [
        ({"resolutoin": 480}, 0, r"dataset 'clips'.*unknown key 'resolutoin' \(did you mean 'resolution'\?\)"),
        ({"video": {"num_frames": 90}}, 0, r"dataset 'clips'.*video.num_frames.*90 frames: \(frames - 1\) must be divisible by 4.*use 89 or 93"),
        ({"conditioning_data": []}, 0, r"dataset 'clips'.*is_i2v is true but conditioning_data is empty"),
        ({"conditioning_data": ["nope"]}, 0, r"dataset 'clips' key 'conditioning_data' names 'nope'"),
        ({"dataset_type": "video"}, 1, r"names 'starts', whose dataset_type is 'video'; set it to 'conditioning'"),
        ({"resolution": 470}, 0, r"dataset 'clips'.*key 'resolution'.*not a multiple of 16; use 464 or 480"),
        ({"resolution": "480x830"}, 0, r"dataset 'clips'.*480x830: height and width must be divisible by 16"),
        ({"caption_strategy": "instanceprompt"}, 0, r"needs instance_prompt"),
        ({"cache_dir_vae": "/c/s"}, 0, r"share cache_dir_vae"),
        ({"id": "starts"}, 0, r"'starts' appears twice"),
        ({"dataset_type": "movie"}, 0, r"dataset 'clips'.*key 'dataset_type'"),
        ({"video": {"num_frames": 93, "min_frames": 97}}, 0, r"min_frames 97 > num_frames 93"),
        # The start frame is latent 0: an I2V clip of 1-4 frames (one latent) has nothing to denoise.
        ({"video": {"num_frames": 1}}, 0, r"dataset 'clips'.*is_i2v needs clips of at least 5 frames.*video.num_frames 1"),
        ({"video": {"num_frames": 9, "min_frames": 3}}, 0, r"dataset 'clips'.*at least 5 frames.*set video.min_frames to 5"),
    ],
)
def test_bad_values_name_the_dataset_key_and_fix(change, index, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_datasets(_with(change, index))


def test_eval_split_missing_or_wrong_kind():
    datasets = parse_datasets(_with({}))
    with pytest.raises(ConfigError, match=r"eval split missing: eval_dataset_id 'longcat-video-val'") as err:
        datasets.split("longcat-video-val")
    # The guide's default id with no eval split written: the way to train without one is named too.
    assert "eval_dataset_id: null and validation_using_datasets: false" in str(err.value)
    with pytest.raises(ConfigError, match=r"is a conditioning dataset"):
        datasets.split("starts")
    with pytest.raises(ConfigError, match=r"no enabled video or image dataset left to train on"):
        datasets.split("clips")


def test_relative_paths_resolve_against_the_file_and_comments_are_allowed(tmp_path):
    path = tmp_path / "multidatabackend.json"
    path.write_text(
        '// datasets\n[{"id": "clips", "dataset_type": "video", "instance_data_dir": "media/clips", '
        '"cache_dir_vae": "cache/clips", "cache_dir_text": "cache/text"}]'
    )
    (dataset,) = load_datasets(path).datasets
    assert dataset.instance_data_dir == tmp_path / "media/clips"
    assert dataset.text_cache_dir == tmp_path / "cache/text"
    with pytest.raises(ConfigError, match="does not exist; create it with `cp config/multidatabackend.json.example"):
        load_datasets(tmp_path / "missing.json")


@pytest.mark.parametrize("key", ["instance_data_dir", "cache_dir_text"])
@pytest.mark.parametrize("value, shown", [(True, "true"), (5, "5"), (["a", "b"], '["a", "b"]')])
def test_a_dataset_path_key_that_is_not_a_string_is_refused(tmp_path, key, value, shown):
    entry = {"id": "clips", "dataset_type": "video", "instance_data_dir": "media", "cache_dir_vae": "cache/clips", key: value}
    (tmp_path / "multidatabackend.json").write_text(json.dumps([entry]))
    with pytest.raises(ConfigError, match=re.escape(f"key '{key}': expected a path (a string), not {shown}")):
        load_datasets(tmp_path / "multidatabackend.json")
