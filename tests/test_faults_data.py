"""Hostile and careless inputs to the config schema, the data scan and `check` (issue 10, items 3, 4, 5, 9, 10).

Each test feeds one bad input the way a user would (config.json text, files in a data folder, a damaged
checkpoint folder) and asserts the named error or the per-item report, and that the good items around
it stay usable. CPU only, tiny files; `check` never loads weights or imports torch.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from longcat_tuner.cli import main as cli_main
from longcat_tuner.config.datasets import DatasetConfig, VideoSettings, load_datasets, parse_datasets
from longcat_tuner.config.training import TrainConfig, _numeric_kind
from longcat_tuner.data.backends import plan_data, scan_media
from longcat_tuner.data.images import MAX_IMAGE_PIXELS, load_image, open_image, probe_image
from longcat_tuner.data.synthetic import write_image, write_video
from longcat_tuner.data.video import plan_resize
from longcat_tuner.errors import CheckpointError, ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO.parent / "shared" / "reference" / "longcat-tiny"
BASE = {"pretrained_model_name_or_path": "m", "output_dir": "o", "data_backend_config": "d"}


# --- helpers ----------------------------------------------------------------------------------------
def add_pair(root: Path, key: str, caption: str = "a red bar slides", clips: str = "clips", starts: str = "starts") -> None:
    write_video(root / clips / f"{key}.mp4", frames=18, fps=30, height=48, width=80)
    write_image(root / starts / f"{key}.png", height=48, width=80)
    (root / clips / f"{key}.txt").write_bytes(caption.encode("utf-8"))


def write_datasets(root: Path, *, eval_dir: str | None = None, eval_starts: str = "val-starts") -> Path:
    datasets = [
        {"id": "train", "dataset_type": "video", "is_i2v": True, "instance_data_dir": "clips", "resolution": 32,
         "cache_dir_vae": "cache/clips", "conditioning_data": ["train-cond"], "video": {"num_frames": 5}},
        {"id": "train-cond", "dataset_type": "conditioning", "instance_data_dir": "starts", "caption_strategy": None,
         "resolution": 32, "cache_dir_vae": "cache/starts"},
    ]
    if eval_dir is not None:
        datasets += [
            {"id": "val", "dataset_type": "video", "is_i2v": True, "instance_data_dir": eval_dir, "resolution": 32,
             "cache_dir_vae": "cache/val", "conditioning_data": ["val-cond"], "video": {"num_frames": 5}},
            {"id": "val-cond", "dataset_type": "conditioning", "instance_data_dir": eval_starts,
             "caption_strategy": None, "resolution": 32, "cache_dir_vae": "cache/val-starts"},
        ]
    path = root / "multidatabackend.json"
    path.write_text(json.dumps(datasets))
    return path


def write_train_config(root: Path, model: Path, **settings) -> Path:
    config = root / "config.json"
    config.write_text(json.dumps({
        "pretrained_model_name_or_path": str(model), "output_dir": "out",
        "data_backend_config": str(root / "multidatabackend.json"), "eval_dataset_id": None,
        "validation_using_datasets": False, "aspect_bucket_alignment": 16, **settings,
    }))
    return config


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_bomb_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A valid 1-bit black PNG of width x height: ~110 KB on disk, 900 Mpixel (2.7 GB as RGB) when decoded."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0 + a row of zero bits
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + png_chunk(b"IDAT", data)
        + png_chunk(b"IEND", b"")
    )
    return path


def check_json(config_or_datasets: list[str], capsys) -> tuple[int, dict]:
    capsys.readouterr()
    code = cli_main(["check", *config_or_datasets, "--json"])
    return code, json.loads(capsys.readouterr().out)


def copy_tiny(tmp_path: Path) -> Path:
    if not TINY.is_dir():
        pytest.skip(f"the tiny checkpoint is not at {TINY}")
    target = tmp_path / "model"
    shutil.copytree(TINY, target)
    for path in target.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --- item 3: non-finite and absurd hyperparameters --------------------------------------------------------
@pytest.mark.parametrize(
    "text, key, words",
    [
        ('"learning_rate": Infinity', "learning_rate", "finite number"),
        ('"learning_rate": -Infinity', "learning_rate", "finite number"),
        ('"learning_rate": NaN', "learning_rate", "finite number"),
        ('"learning_rate": 1e30', "learning_rate", "less than or equal to 10"),
        ('"learning_rate": 5.0', "learning_rate", "'adamw' (valid: 0 < learning_rate <= 1"),
        ('"lora_alpha": Infinity', "lora_alpha", "valid: 0 < lora_alpha <= 4096"),
        ('"flow_schedule_shift": NaN', "flow_schedule_shift", "valid: 0 < flow_schedule_shift <= 100"),
        ('"flow_schedule_shift": 1e9', "flow_schedule_shift", "valid: 0 < flow_schedule_shift <= 100"),
        ('"max_grad_norm": Infinity', "max_grad_norm", "finite number"),
        ('"validation_loss_sigmas": [0.5, NaN]', "validation_loss_sigmas.1", "finite number"),
    ],
)
def test_non_finite_and_absurd_numbers_in_config_json_are_refused_by_key(tmp_path, text, key, words):
    path = tmp_path / "config.json"
    path.write_text('{"pretrained_model_name_or_path": "m", "output_dir": "o", "data_backend_config": "d", ' + text + "}")
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_file(path)
    message = str(caught.value)
    assert str(path) in message and key in message and words in message


def test_every_float_key_of_both_schemas_refuses_non_finite_values():
    """Finiteness is a schema-wide rule: a float key added later is covered without a per-key patch."""
    float_keys = [name for name, field in TrainConfig.model_fields.items() if _numeric_kind(field.annotation) is float]
    assert {"learning_rate", "lora_alpha", "flow_schedule_shift", "adam_beta1", "validation_guidance"} <= set(float_keys)
    for name in float_keys:
        is_list = "list" in str(TrainConfig.model_fields[name].annotation)
        for bad in (float("inf"), float("-inf"), float("nan")):
            with pytest.raises(ConfigError, match=rf"{name}(\.0)?: Input should be a finite number"):
                TrainConfig.from_dict({**BASE, name: [bad] if is_list else bad})
    # The command line takes the same path (`--learning_rate inf` parses as float('inf')).
    with pytest.raises(ConfigError, match="learning_rate: Input should be a finite number"):
        TrainConfig.from_dict({**BASE, "learning_rate": float("inf")})
    entry = {"id": "a", "dataset_type": "video", "instance_data_dir": "x", "cache_dir_vae": "c"}
    video_floats = [name for name, field in VideoSettings.model_fields.items() if _numeric_kind(field.annotation) is float]
    assert video_floats == ["fps"]
    for name in video_floats:
        for bad in (float("inf"), float("nan")):
            with pytest.raises(ConfigError, match=rf"dataset 'a'.*key 'video.{name}': Input should be a finite number"):
                parse_datasets([{**entry, "video": {name: bad}}])
    assert DatasetConfig.model_config.get("allow_inf_nan") is False  # for float keys added to an entry later


def test_web_config_api_refuses_infinity_through_the_same_schema(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from longcat_tuner.server.app import ServerSettings, create_app

    work = tmp_path / "work"
    (work / "model").mkdir(parents=True)
    settings = ServerSettings(token="t0ken", data_dir=tmp_path / "data", allowed_roots=(work,), cwd=work)
    client = TestClient(create_app(settings), base_url="http://127.0.0.1:8765")
    body = {
        "config": {"pretrained_model_name_or_path": str(work / "model"), "output_dir": "out", "max_train_steps": 3,
                   "eval_dataset_id": None, "validation_using_datasets": False, "learning_rate": float("inf")},
        "datasets": [
            {"id": "clips", "dataset_type": "video", "is_i2v": False, "instance_data_dir": str(work / "clips"),
             "cache_dir_vae": str(work / "cache" / "video")},
        ],
    }
    # JSON `Infinity` on the wire, as a hand-written request or a script would send it.
    raw = json.dumps(body)
    assert "Infinity" in raw
    headers = {"Authorization": "Bearer t0ken", "X-Longcat-Tuner": "1", "Content-Type": "application/json"}
    result = client.post("/api/config/validate", content=raw, headers=headers).json()
    messages = {tuple(error["loc"]): error["msg"] for error in result["errors"]}
    assert not result["valid"] and "finite number" in messages[("config", "learning_rate")]
    assert client.put("/api/config", content=raw, headers=headers).status_code == 422
    assert not settings.config_path.exists()


# --- item 4: decompression bombs ---------------------------------------------------------------------
def test_a_decompression_bomb_start_frame_is_skipped_by_name_and_the_rest_trains(tmp_path, capsys):
    add_pair(tmp_path, "good")
    add_pair(tmp_path, "bomb")
    write_bomb_png(tmp_path / "starts" / "bomb.png")
    assert (tmp_path / "starts" / "bomb.png").stat().st_size < 200_000
    datasets = write_datasets(tmp_path)
    code, summary = check_json(["--data_backend_config", str(datasets), "--data-only"], capsys)
    assert code == 0 and summary["train_items"] == 1
    (skipped,) = summary["datasets"][0]["skipped"]
    assert skipped["path"].endswith("bomb.png")
    limit = MAX_IMAGE_PIXELS // 1_000_000
    assert skipped["reason"].startswith(f"image is 30000x30000 = 900 Mpixel, over the limit of {limit} Mpixel; downscale it")
    # The training-side loaders (cache build, sampling) refuse it the same way, before decoding a pixel.
    with pytest.raises(DataError, match="30000x30000 = 900 Mpixel"):
        load_image(tmp_path / "starts" / "bomb.png", plan_resize(30000, 30000, 32, 32))
    from longcat_tuner.data.images import read_image as load_sampling_image

    with pytest.raises(DataError, match="30000x30000 = 900 Mpixel"):
        load_sampling_image(tmp_path / "starts" / "bomb.png")


def test_open_image_enforces_its_own_pixel_limit_below_pillows(tmp_path):
    # 9000x9000 = 81 Mpixel: over our limit, under Pillow's own bomb threshold (Pillow would decode it).
    path = write_bomb_png(tmp_path / "big.png", 9000, 9000)
    with pytest.raises(DataError, match=r"big.png: image is 9000x9000 = 81 Mpixel, over the limit of 80 Mpixel"):
        open_image(path)
    with open_image(path, max_pixels=100_000_000) as image:  # a caller (thumbnails) may choose its own limit
        assert image.size == (9000, 9000)
    with pytest.raises(DataError, match="not a readable image"):
        (tmp_path / "text.png").write_text("not a png")
        open_image(tmp_path / "text.png")


def test_a_bomb_in_an_image_dataset_is_skipped_by_name(tmp_path):
    write_image(tmp_path / "imgs" / "fine.png", height=48, width=80)
    (tmp_path / "imgs" / "fine.txt").write_text("a grey card")
    write_bomb_png(tmp_path / "imgs" / "huge.png")
    (tmp_path / "imgs" / "huge.txt").write_text("a black card")
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps([{"id": "stills", "dataset_type": "image", "instance_data_dir": "imgs",
                                 "resolution": 32, "cache_dir_vae": "cache/imgs"}]))
    (plan,) = plan_data(load_datasets(path), eval_dataset_id=None, alignment=16).train
    assert [s.source.key for s in plan.samples] == ["fine"]
    (skipped,) = plan.skipped
    assert skipped.path.endswith("huge.png") and "900 Mpixel" in skipped.reason


# --- item 5: symbolic link loops ---------------------------------------------------------------------
def test_symlink_loops_and_aliases_neither_hang_nor_multiply_items(tmp_path):
    add_pair(tmp_path, "a")
    add_pair(tmp_path, "sub/b")
    clips, starts = tmp_path / "clips", tmp_path / "starts"
    os.symlink(".", clips / "loop")  # clips/loop/loop/... is clips again (one loop: the old walk multiplied items)
    os.symlink("sub", clips / "alias")  # a second name for a folder
    os.symlink("a.mp4", clips / "a_again.mp4")  # a second name for a file
    os.symlink(".", starts / "loop")
    (clips / "a_again.txt").write_text("x")
    plan = plan_data(load_datasets(write_datasets(tmp_path)), eval_dataset_id=None, alignment=16)
    (train,) = plan.train
    assert sorted(s.source.key for s in train.samples) == ["a", "sub/b"]
    assert train.scanned == 2 and not plan.conditioning_problems
    warnings = {p.path: p.reason for p in train.warnings}
    assert len(warnings) == 4
    assert warnings[str(clips / "loop")].startswith(f"symbolic link loop: points to {clips.resolve()}, a folder that contains it")
    assert warnings[str(starts / "loop")].startswith(f"symbolic link loop: points to {starts.resolve()}")
    assert warnings[str(clips / "alias")].startswith(f"symbolic link to {(clips / 'sub').resolve()}, a folder already scanned")
    assert warnings[str(clips / "a_again.mp4")].startswith(f"same file as {clips / 'a.mp4'}")


def test_many_loops_finish_fast_in_a_fresh_process(tmp_path):
    """Several loops make a naive followlinks walk exponential (it hung `check`); the scan visits each folder once."""
    folder = tmp_path / "clips"
    add_pair(tmp_path, "x")
    for name in ("l1", "l2", "l3"):
        os.symlink(".", folder / name)
    (folder / "sub").mkdir()
    os.symlink("..", folder / "sub" / "up")  # a loop one level down
    script = (
        "import sys; from pathlib import Path; from longcat_tuner.data.backends import scan_media; "
        f"found, problems = scan_media(Path({str(folder)!r}), ('.mp4',), 'd'); "
        "print(len(found)); print('\\n'.join(sorted(Path(p.path).name + ': ' + p.reason for p in problems)))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    lines = result.stdout.splitlines()
    assert lines[0] == "1", result.stderr
    assert [line.split(":")[0] for line in lines[1:]] == ["l1", "l2", "l3", "up"]
    assert all("symbolic link loop" in line for line in lines[1:])


def test_a_file_linked_from_another_folder_prefers_the_real_name(tmp_path):
    real = tmp_path / "media" / "z_real.mp4"
    write_video(real, frames=18, fps=30, height=48, width=80)
    os.symlink(real, tmp_path / "media" / "a_link.mp4")
    os.symlink(tmp_path / "media" / "missing.mp4", tmp_path / "media" / "broken.mp4")
    found, problems = scan_media(tmp_path / "media", (".mp4",), "d")
    assert found == {"z_real": real}
    reasons = {Path(p.path).name: (p.reason, p.skipped) for p in problems}
    assert reasons["a_link.mp4"] == (f"same file as {real} (reached through a symbolic link); counted once", False)
    assert reasons["broken.mp4"][0].startswith("broken symbolic link to") and reasons["broken.mp4"][1]


# --- item 9: broken model folders, out-of-range counts ---------------------------------------------------
def test_check_passes_the_intact_tiny_checkpoint_without_importing_torch(tmp_path):
    add_pair(tmp_path, "a")
    write_datasets(tmp_path)
    config = write_train_config(tmp_path, copy_tiny(tmp_path))
    script = (
        "import sys; from longcat_tuner.cli import main; code = main(['check', '--config', sys.argv[1]]); "
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'); sys.exit(code)"
    )
    result = subprocess.run([sys.executable, "-c", script, str(config)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "[model]" in result.stdout and "dit 2 blocks, hidden 256, 56 tensors in 1 file(s)" in result.stdout
    assert result.stdout.strip().endswith("NO-TORCH")


@pytest.mark.parametrize(
    "damage, words",
    [
        ("truncate text_encoder/model.safetensors", "text_encoder/model.safetensors is truncated: 171860 bytes, but its header describes 343720"),
        ("truncate dit/diffusion_pytorch_model.safetensors", "dit/diffusion_pytorch_model.safetensors is truncated"),
        ("truncate vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors is truncated"),
        ("garbage dit/config.json", "dit/config.json is not valid JSON"),
        ("list dit/config.json", "dit/config.json: expected a JSON object of DiT settings"),
        ("string-width dit/config.json", "dit/config.json: key 'hidden_size' must be a whole number"),
        ("deeper dit/config.json", "21 missing (blocks.2.adaLN_modulation.1.bias"),
        ("wider dit/config.json", "blocks.0.attn.proj.weight (256, 256) in diffusion_pytorch_model.safetensors, expected (512, 512)"),
        ("garbage text_encoder/config.json", "text_encoder/config.json is not valid JSON"),
        ("garbage vae/config.json", "vae/config.json is not valid JSON"),
        ("garbage tokenizer/tokenizer.json", "tokenizer/tokenizer.json is not valid JSON"),
        ("header dit/diffusion_pytorch_model.safetensors", "dit/diffusion_pytorch_model.safetensors has a damaged safetensors header"),
    ],
)
def test_check_names_a_broken_model_file(tmp_path, capsys, damage, words):
    model = copy_tiny(tmp_path)
    action, target = damage.split(" ")
    path = model / target
    if action == "truncate":
        truncate(path)
    elif action == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif action == "list":
        path.write_text("[1, 2, 3]")
    elif action in ("string-width", "deeper", "wider"):
        config = json.loads(path.read_text())
        config.update({"string-width": {"hidden_size": "wide"}, "deeper": {"depth": 3}, "wider": {"hidden_size": 512}}[action])
        path.write_text(json.dumps(config))
    elif action == "header":
        data = bytearray(path.read_bytes())
        data[8:20] = b"\xff" * 12  # the JSON header's first bytes
        path.write_bytes(bytes(data))
    add_pair(tmp_path, "a")
    write_datasets(tmp_path)
    code, summary = check_json(["--config", str(write_train_config(tmp_path, model))], capsys)
    assert code == 1 and not summary["ok"] and not summary["model"]["ok"]
    assert summary["train_items"] == 1  # the data is fine; the model folder is what stops training
    assert any(words in problem for problem in summary["blocking"]), summary["blocking"]


def test_sharded_dit_with_a_missing_or_misplaced_shard_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    from longcat_tuner.model.inspect import inspect_model

    model = copy_tiny(tmp_path)
    dit = model / "dit"
    tensors = load_file(str(dit / "diffusion_pytorch_model.safetensors"))
    (dit / "diffusion_pytorch_model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"dit-00001-of-00002.safetensors": names[: len(names) // 2], "dit-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(dit / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (dit / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert inspect_model(model).ok  # a correct sharded layout passes
    index["weight_map"][names[0]] = "dit-00002-of-00002.safetensors"
    (dit / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (problem,) = inspect_model(model).problems
    assert "1 tensor(s) are not in the shard the index names" in problem and names[0] in problem
    (dit / "dit-00002-of-00002.safetensors").unlink()
    (problem,) = inspect_model(model).problems
    assert "missing shards listed in diffusion_pytorch_model.safetensors.index.json: dit-00002-of-00002.safetensors" in problem


def test_the_loaders_name_a_truncated_safetensors_file(tmp_path):
    from longcat_tuner.encoders.text import TextEncoder
    from longcat_tuner.encoders.vae import VideoVAE
    from longcat_tuner.model.loading import load_dit

    model = copy_tiny(tmp_path)
    for path in (model / "text_encoder/model.safetensors", model / "vae/diffusion_pytorch_model.safetensors",
                 model / "dit/diffusion_pytorch_model.safetensors"):
        truncate(path, 0.9)
    with pytest.raises(CheckpointError, match=r"text_encoder/model.safetensors is truncated"):
        TextEncoder.from_pretrained(model)
    with pytest.raises(CheckpointError, match=r"vae/diffusion_pytorch_model.safetensors is truncated"):
        VideoVAE.from_pretrained(model)
    with pytest.raises(CheckpointError, match=r"dit/diffusion_pytorch_model.safetensors is truncated"):
        load_dit(model)
    (model / "dit/config.json").write_bytes(b"\x00\xff garbage")
    with pytest.raises(CheckpointError, match=r"dit/config.json is not valid JSON"):
        load_dit(model)


def test_expected_dit_shapes_match_the_model_the_loader_builds():
    from longcat_tuner.model.config import DiTConfig
    from longcat_tuner.model.loading import build_dit

    for config in (
        DiTConfig(hidden_size=256, depth=2, num_heads=2, caption_channels=64, adaln_tembed_dim=64),
        DiTConfig(hidden_size=96, depth=3, num_heads=3, caption_channels=32, adaln_tembed_dim=16, mlp_ratio=2.5,
                  patch_size=(1, 4, 2), in_channels=8, out_channels=4, frequency_embedding_size=64),
    ):
        built = {name: tuple(t.shape) for name, t in build_dit(config).state_dict().items()}
        assert built == config.expected_shapes()


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("seed", 2**70, "seed: Input should be less than or equal to 9223372036854775807"),
        ("seed", -1, "valid: 0 <= seed <= 2**63-1 (whole number)"),
        ("validation_seed", 2**64, "valid: 0 <= validation_seed <= 2**63-1"),
        ("lora_rank", 1e6, "valid: 1 <= lora_rank <= 1024 (whole number)"),
        ("max_train_steps", 1e12, "valid: 1 <= max_train_steps <= 1e9"),
        ("max_train_steps", True, "max_train_steps: expected a whole number, not true"),
        ("train_batch_size", False, "train_batch_size: expected a whole number, not false"),
        ("gradient_accumulation_steps", True, "expected a whole number, not true"),
        ("learning_rate", True, "learning_rate: expected a number, not true"),
    ],
)
def test_out_of_range_and_boolean_counts_are_refused_with_the_valid_range(key, value, words):
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_dict({**BASE, key: value})
    assert words in str(caught.value)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"repeats": 1e10}, "key 'repeats': Input should be less than or equal to 10000 (got 10000000000.0); valid: 0 <= repeats <= 10000"),
        ({"repeats": True}, "key 'repeats': expected a whole number, not true"),
        ({"video": {"fps": 1e9}}, "key 'video.fps': Input should be less than or equal to 240"),
        ({"video": {"fps": 0.01}}, "valid: 1 <= fps <= 240 (finite number)"),
        ({"video": {"num_frames": True}}, "key 'video.num_frames': expected a whole number, not true"),
        ({"video": {"num_frames": 1 + 4 * 10**6}}, "valid: 1 <= num_frames <= 4097"),
        ({"resolution": 10**6}, "too large (at most 4096)"),
    ],
)
def test_dataset_counts_are_bounded_and_never_booleans(change, words):
    entry = {"id": "clips", "dataset_type": "video", "instance_data_dir": "x", "cache_dir_vae": "c", **change}
    with pytest.raises(ConfigError) as caught:
        parse_datasets([entry], source="mdb.json")
    assert "mdb.json: dataset 'clips'" in str(caught.value) and words in str(caught.value)


def test_check_refuses_a_lora_rank_wider_than_the_adapted_layers(tmp_path, capsys):
    add_pair(tmp_path, "a")
    write_datasets(tmp_path)
    model = copy_tiny(tmp_path)  # hidden 256: every adapted linear has min(in, out) = 256
    code, summary = check_json(["--config", str(write_train_config(tmp_path, model, lora_rank=512))], capsys)
    assert code == 1
    assert any("lora_rank 512 is larger than the narrowest adapted layer (attn.qkv: 256 in, 768 out)" in p
               and "at most 256" in p for p in summary["blocking"])
    code, _ = check_json(["--config", str(write_train_config(tmp_path, model, lora_rank=256))], capsys)
    assert code == 0


# --- item 10: eval split overlap, control-character captions, truncated start frames ----------------------
def test_an_eval_split_on_the_training_folder_is_refused_naming_both(tmp_path, capsys):
    add_pair(tmp_path, "a")
    add_pair(tmp_path, "v", clips="clips/held-out", starts="val-starts")
    for eval_dir, words in (("clips", "use the same folder"), ("clips/held-out", "is inside")):
        datasets = write_datasets(tmp_path, eval_dir=eval_dir)
        with pytest.raises(ConfigError) as caught:
            plan_data(load_datasets(datasets), eval_dataset_id="val", alignment=16)
        message = str(caught.value)
        assert "eval split 'val' and training dataset 'train'" in message and words in message
        assert cli_main(["check", "--data_backend_config", str(datasets), "--eval_dataset_id", "val", "--data-only"]) != 0


def test_an_eval_split_sharing_files_with_training_through_links_is_refused(tmp_path):
    add_pair(tmp_path, "a")
    add_pair(tmp_path, "b")
    (tmp_path / "val-clips").mkdir()
    os.symlink(tmp_path / "clips" / "a.mp4", tmp_path / "val-clips" / "a.mp4")  # the same clip under another folder
    shutil.copy(tmp_path / "clips" / "a.txt", tmp_path / "val-clips" / "a.txt")
    write_image(tmp_path / "val-starts" / "a.png", height=48, width=80)
    datasets = write_datasets(tmp_path, eval_dir="val-clips")
    with pytest.raises(DataError) as caught:
        plan_data(load_datasets(datasets), eval_dataset_id="val", alignment=16)
    message = str(caught.value)
    assert "eval split 'val' and training dataset 'train' share 1 file(s)" in message
    assert str(tmp_path / "val-clips" / "a.mp4") in message and str(tmp_path / "clips" / "a.mp4") in message


def test_control_characters_are_stripped_from_captions_and_an_all_control_caption_is_empty(tmp_path):
    add_pair(tmp_path, "mixed", caption="a red\x00 bar\x1b[0m\x07 slides\r\nto the left\x7f")
    add_pair(tmp_path, "nuls", caption="\x00\x00\x00\x01\x02")
    add_pair(tmp_path, "clean", caption="a clean\tcaption")
    (train,) = plan_data(load_datasets(write_datasets(tmp_path)), eval_dataset_id=None, alignment=16).train
    captions = {s.source.key: s.source.caption for s in train.samples}
    assert captions == {"mixed": "a red bar[0m slides to the left", "nuls": "", "clean": "a clean caption"}
    warnings = {Path(p.path).name: p.reason for p in train.warnings}
    assert warnings["mixed.mp4"].startswith("caption file mixed.txt: 4 control characters (NUL, ESC, ...) removed")
    assert warnings["nuls.mp4"].startswith("caption file nuls.txt is empty (it holds only control characters, 5 removed)")
    assert "clean.mp4" not in warnings


def test_a_truncated_start_frame_is_unusable_in_check_as_in_training(tmp_path, capsys):
    add_pair(tmp_path, "good")
    add_pair(tmp_path, "cut")
    # A noisy image, so the PNG has real compressed data to cut (a flat one compresses to a few bytes).
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 255, size=(48, 80, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "starts" / "cut.png")
    truncate(tmp_path / "starts" / "cut.png", 0.6)
    # The training side (cache build) cannot use it:
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_image(tmp_path / "starts" / "cut.png", plan_resize(48, 80, 32, 64))
    # ... and `check` says so too, instead of counting it usable.
    with pytest.raises(DataError, match="corrupt or truncated"):
        probe_image(tmp_path / "starts" / "cut.png")
    assert probe_image(tmp_path / "starts" / "cut.png", decode=False) == (48, 80)  # the header alone looks fine
    code, summary = check_json(["--data_backend_config", str(write_datasets(tmp_path)), "--data-only"], capsys)
    assert code == 0 and summary["train_items"] == 1
    (skipped,) = summary["datasets"][0]["skipped"]
    assert skipped["path"].endswith("cut.png") and skipped["reason"].startswith("image data is corrupt or truncated")


def test_a_start_frame_with_corrupt_compressed_data_is_unusable_in_check_as_in_training(tmp_path):
    """Before: `probe_image` read the EXIF first; for a PNG that decodes the pixels, its failure was swallowed and
    the decode after it returned the half-decoded image as intact, so `check` counted a start frame that the
    cache build then failed on."""
    import numpy as np
    from PIL import Image

    path = tmp_path / "bad.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, size=(32, 32, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4 + 20  # inside the zlib stream: the file is complete, its pixels are not
    data[start] ^= 0xFF
    data[start + 50] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_image(path, plan_resize(32, 32, 32, 32))
    with pytest.raises(DataError, match="corrupt or truncated"):
        probe_image(path)


def test_a_failed_video_or_lora_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import numpy as np
    import safetensors.torch
    import torch

    from longcat_tuner.media import write_mp4
    from longcat_tuner.model.lora_formats import Adapter, write_lora_file

    frames = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    bad = np.zeros((3, 16, 16), dtype=np.uint8)  # no channel axis: PyAV refuses it after the file is opened
    with pytest.raises(Exception):
        write_mp4(tmp_path / "video.mp4", bad)
    assert list(tmp_path.iterdir()) == []
    assert write_mp4(tmp_path / "video.mp4", frames).is_file()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    adapter = Adapter(down=torch.zeros(2, 4), ups=[torch.zeros(4, 2)], scale=1.0)
    with pytest.raises(OSError):
        write_lora_file({"blocks.0.attn.proj": adapter}, tmp_path / "lora" / "x.safetensors", "official")
    assert list((tmp_path / "lora").iterdir()) == []
