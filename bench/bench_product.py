"""Benchmark: the product end to end, run as a user runs it, at full size on one GPU; JSON lines out.

It writes a random-weight checkpoint in the official hub layout (`--size full`: the 13.6B DiT and a
umT5-XXL-shaped encoder in sharded bf16 files with their `*.index.json`, the Wan 2.1 VAE, tokenizer and
scheduler; `--size tiny` for a CPU smoke run), synthetic paired clips (clip + start frame + caption) at
93 frames, the guide's `config.json` / `multidatabackend.json` examples with only paths filled, and then
runs the `longcat-tuner` command line in subprocesses, exactly as a user would:

1. `check`, then `cache` (seconds per clip from the cache report);
2. per memory cap (`--caps 24,48,80,whole`): `train` with the guide's config and no memory key set (auto
   settings), a few steps (`--steps`), one checkpoint, one short validation (`--validation-steps`
   denoising steps) and `--max_gpu_memory_gib` = the cap. For the cap named by `--kill-resume`, the run is
   SIGKILLed right after its last step's loss is logged (before the final save), then run again with
   `--resume_from_checkpoint latest`: the resumed steps' losses are compared with the killed run's;
3. `sample` with the trained LoRA (under the first cap of `--sample-caps`).

Per cap it reports the plan `train` chose (events.jsonl `memory_plan`), s/step (median of the steps after
the first, from the `step` events), peak allocated and reserved GiB (step events) and the GPU's peak
memory used as nvidia-smi saw it (polled), validation seconds per video, checkpoint seconds, and the
resume comparison. Each stage prints one JSON line as it ends and appends it to `--out`, so a run cut
short keeps what it measured. The checkpoint is written once per `--work` folder (a marker file).

Usage (GPU): `python bench/bench_product.py --work /tmp/lct-product --caps whole --kill-resume whole --out $OUT/product.jsonl`
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from longcat_tuner.train.events import read_events  # noqa: E402

DEADLINE: Optional[float] = None  # perf_counter() by which every command must have ended (--budget-s)
GUIDE_CONFIG = REPO / "config" / "config.json.example"
GUIDE_DATASETS = REPO / "config" / "multidatabackend.json.example"
COMPLETE_MARK = ".bench-complete"


# --- inputs -------------------------------------------------------------------------------------------------
def write_checkpoint(root: Path, size: str) -> float:
    """The random checkpoint (once per folder); returns the seconds spent writing it (0 when it existed).

    Written by a child process: the tensors are drawn on the GPU, and memory this process kept cached there
    would be taken from the runs measured after it."""
    if (root / COMPLETE_MARK).is_file():
        return 0.0
    started = time.perf_counter()
    code = ("import sys; from longcat_tuner.model.random_checkpoint import write_random_checkpoint; "
            "write_random_checkpoint(sys.argv[1], size=sys.argv[2], seed=0)")
    subprocess.run([sys.executable, "-c", code, str(root), size], check=True, cwd=str(REPO))
    (root / COMPLETE_MARK).write_text(size)
    return time.perf_counter() - started


def nvidia_smi(fields: str) -> Optional[list[str]]:
    """GPU 0's `--query-gpu` values (e.g. "name,memory.total"), or None without a working nvidia-smi. The
    benchmark asks nvidia-smi, never torch, so this process creates no CUDA context."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return [value.strip() for value in lines[0].split(",")] if out.returncode == 0 and lines else None


def gpu_name_and_memory() -> tuple[str, Optional[float]]:
    """The GPU's name and GiB ("cpu", None without one)."""
    values = nvidia_smi("name,memory.total")
    try:
        return values[0], round(float(values[1]) / 1024, 1)
    except (TypeError, ValueError, IndexError):
        return "cpu", None


def data_folder(work: Path, resolution: Optional[str]) -> Path:
    """The clips' folder: `data`, or `data-<resolution>` for a run with `--data-resolution`."""
    return work / ("data" if resolution is None else f"data-{resolution}")


def write_guide_config(work: Path, model: Path, *, clips: int, frames: int, height: int, width: int, shrink: bool,
                       resolution: Optional[str] = None) -> Path:
    """Clips for the guide's four datasets and its two JSON files with only paths filled (`shrink`: the
    tiny smoke run also sets the datasets' size and frame count, since 480p x 93 cannot run on a CPU;
    `resolution`: every dataset's `resolution` key, e.g. "704x1280", with clips and caches in folders of
    their own, so runs at several sizes share one checkpoint)."""
    from longcat_tuner.commands.demo import write_split

    data = data_folder(work, resolution)
    if not (data / COMPLETE_MARK).is_file():
        train = write_split(data / "train", count=clips, frames=frames, height=height, width=width, seed=0)
        val = write_split(data / "val", count=1, frames=frames, height=height, width=width, seed=1)
        (data / COMPLETE_MARK).write_text("")
    else:
        train = (data / "train" / "clips", data / "train" / "start-frames")
        val = (data / "val" / "clips", data / "val" / "start-frames")
    folders = {"longcat-video-train": train[0], "longcat-video-cond": train[1],
               "longcat-video-val": val[0], "longcat-video-val-cond": val[1]}
    datasets = json.loads(GUIDE_DATASETS.read_text())
    for entry in datasets:
        entry["instance_data_dir"] = str(folders[entry["id"]])
        entry["cache_dir_vae"] = str(work / ("cache" if resolution is None else f"cache-{resolution}") / entry["id"])
        if resolution is not None:
            entry["resolution"] = resolution
        if shrink:
            entry["resolution"] = f"{height}x{width}"
            if "video" in entry:
                entry["video"]["num_frames"] = frames
    (work / "multidatabackend.json").write_text(json.dumps(datasets, indent=2))
    config = json.loads(GUIDE_CONFIG.read_text())
    config.update(pretrained_model_name_or_path=str(model), output_dir=str(work / "runs" / "unused"),
                  data_backend_config="multidatabackend.json")
    path = work / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


# --- running the CLI --------------------------------------------------------------------------------------
class GpuMemoryPoll:
    """Peak `memory.used` of GPU 0 as nvidia-smi reports it, polled in a thread (None without nvidia-smi)."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_mib: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> Optional[float]:
        values = nvidia_smi("memory.used")
        try:
            return float(values[0])
        except (TypeError, ValueError, IndexError):
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self._read()
            if value is not None:
                self.peak_mib = value if self.peak_mib is None else max(self.peak_mib, value)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "GpuMemoryPoll":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_gib(self) -> Optional[float]:
        return None if self.peak_mib is None else round(self.peak_mib / 1024, 2)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "longcat_tuner.cli", *args]


def run_cli(args: list[str], log: Path, *, kill_at_step: Optional[int] = None, events_dir: Optional[Path] = None,
            timeout_s: float = 3600) -> dict[str, Any]:
    """Run one command (output to `log`); with `kill_at_step`, SIGKILL it once events.jsonl in `events_dir`
    holds that step's `step` event. Returns exit code, seconds and the GPU's peak memory used."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if DEADLINE is not None:
        timeout_s = min(timeout_s, max(1.0, DEADLINE - started))
    killed = timed_out = False
    with GpuMemoryPoll() as poll, open(log, "w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        while process.poll() is None:
            if time.perf_counter() - started > timeout_s:
                process.kill()
                timed_out = True
                break
            if kill_at_step is not None and events_dir is not None and _has_step(events_dir, kill_at_step):
                process.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.2)
        code = process.wait()
    return {"exit_code": code, "killed": killed, "timed_out": timed_out, "seconds": round(time.perf_counter() - started, 2),
            "gpu_peak_used_gib": poll.peak_gib, "log": str(log)}


def _has_step(run_dir: Path, step: int) -> bool:
    try:
        return any(e.get("event") == "step" and e.get("step") == step for e in read_events(run_dir))
    except (OSError, ValueError):
        return False


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- reading a run's events -------------------------------------------------------------------------------
def summarize_run(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What one `train` process did, from its events (the part after its last `start`)."""
    starts = [i for i, e in enumerate(events) if e["event"] == "start"]
    events = events[starts[-1]:] if starts else events
    steps = [e for e in events if e["event"] == "step"]
    plans = [e for e in events if e["event"] == "memory_plan"]
    plan = plans[0] if plans else None  # what the run started with; a revision (after an OOM) is reported apart
    revised = next((e for e in reversed(plans) if e.get("revised")), None)
    steady = [e["s_per_step"] for e in steps[1:]]
    validations = [e for e in events if e["event"] == "validation"]
    summary: dict[str, Any] = {
        "steps": [e["step"] for e in steps],
        "losses": {str(e["step"]): e["loss"] for e in steps},
        "first_step_s": round(steps[0]["s_per_step"], 2) if steps else None,
        "s_per_step_median": round(statistics.median(steady), 3) if steady else None,
        "s_per_step_all": [round(e["s_per_step"], 3) for e in steps],
        "peak_allocated_gib": _max(steps, "peak_mem_gib"),
        "peak_reserved_gib": _max(steps, "peak_reserved_gib"),
        # The validation's own peaks (the trainer measures it from a clean allocator), else the run's so far.
        "validation_peak_allocated_gib": _max(validations, "validation_peak_mem_gib"),
        "validation_peak_reserved_gib": _max(validations, "validation_peak_reserved_gib")
        or _max(validations, "peak_reserved_gib"),
        "plan": None if plan is None else {k: plan.get(k) for k in (
            "source", "describe", "settings", "predicted_step_s", "predicted_peak_gib", "predicted_validation_peak_gib",
            "expandable_segments", "budget_gib", "card_gib", "cap_gib")},
        "plan_revised": None if revised is None else {"describe": revised.get("describe"), "reason": revised.get("reason")},
        "checkpoint_s": [],
        "validation_s_per_video": None,
        "end": next((e for e in reversed(events) if e["event"] == "end"), None),
    }
    by_step = {e["step"]: e for e in steps}
    for e in events:
        if e["event"] == "checkpoint" and e.get("step") in by_step:
            summary["checkpoint_s"].append(round(e["time"] - by_step[e["step"]]["time"], 2))
        if e["event"] == "validation":
            before = [x for x in events if x["time"] <= e["time"] and x["event"] in ("step", "checkpoint") and x is not e]
            if before and e.get("items"):
                summary["validation_s_per_video"] = round((e["time"] - before[-1]["time"]) / len(e["items"]), 2)
                summary["validation_breakdown"] = validation_breakdown(events, e, before[-1]["time"])
            summary["validation_items"] = e.get("items")
    return summary


def validation_breakdown(events: list[dict[str, Any]], validation: dict[str, Any], began: float) -> dict[str, Any]:
    """Where one validation's time went, from the trainer's `validation_progress` events (one per denoising step,
    one before the VAE decode, one when the video is decoded): per video the seconds of each denoising step (the
    first includes any compile of the inference graphs; a later video's first also holds the writing of the video
    before it), of the decode, and then what is left until the `validation` event (writing the mp4 and contact
    sheet of the last video, and the held-out loss)."""
    progress = [e for e in events if e["event"] == "validation_progress" and e.get("step") == validation.get("step")
                and began <= e["time"] <= validation["time"]]
    videos: dict[int, dict[str, Any]] = {}
    decode_began: dict[int, float] = {}
    last = began
    for e in progress:
        number = e.get("video", 1)
        video = videos.setdefault(number, {"denoise_step_s": [], "decode_s": None})
        if e.get("phase") == "denoising":
            video["denoise_step_s"].append(round(e["time"] - last, 2))
        elif e.get("phase") == "decoding":
            decode_began[number] = e["time"]
        elif e.get("phase") == "done" and number in decode_began:
            video["decode_s"] = round(e["time"] - decode_began.pop(number), 2)
        last = e["time"]
    return {"videos": [videos[k] for k in sorted(videos)],
            "after_last_video_s": round(validation["time"] - last, 2) if progress else None}


def _max(events: list[dict[str, Any]], key: str) -> Optional[float]:
    values = [e[key] for e in events if e.get(key) is not None]
    return round(max(values), 2) if values else None


def compare_losses(uninterrupted: dict[str, float], resumed: dict[str, float]) -> dict[str, Any]:
    common = sorted(set(uninterrupted) & set(resumed), key=int)
    diffs = {s: abs(uninterrupted[s] - resumed[s]) for s in common}
    return {"steps_compared": common, "max_abs_diff": max(diffs.values()) if diffs else None,
            "equal": bool(common) and all(d == 0.0 for d in diffs.values()),
            "within_1e-3": bool(common) and all(d <= 1e-3 for d in diffs.values())}


# --- stages -------------------------------------------------------------------------------------------------
def emit(out: Optional[Path], record: dict[str, Any]) -> None:
    record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **record}
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(line + "\n")


def train_args(config: Path, run_dir: Path, args: argparse.Namespace, cap: Optional[float], *extra: str) -> list[str]:
    checkpoint_at = max(1, args.steps - 2)  # the resumed run re-runs the last two steps
    flags = ["train", "--config", str(config), "--no-progress", "--output_dir", str(run_dir),
             "--max_train_steps", str(args.steps), "--checkpoint_step_interval", str(checkpoint_at),
             "--validation_num_inference_steps", str(args.validation_steps), "--validation_max_samples", "1"]
    if args.size == "tiny":
        flags += ["--validation_resolution", f"{args.height}x{args.width}", "--validation_num_video_frames", str(args.frames)]
    if cap is not None:
        flags += ["--max_gpu_memory_gib", f"{cap:g}"]
    flags += [item for key, value in args.set for item in set_flag(key, value)]
    return cli(*flags, *extra)


def set_flag(key: str, value: str) -> tuple[str, ...]:
    """`--set KEY=VALUE` as `train`'s flags: a boolean key is `--key` / `--no-key`, the others `--key VALUE`."""
    if value.lower() in ("true", "false"):
        return (f"--{key}",) if value.lower() == "true" else (f"--no-{key}",)
    return (f"--{key}", value)


def run_cap(name: str, cap: Optional[float], config: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    kill = name in args.kill_resume
    name = f"{name}-{args.tag}" if args.tag else name
    run_dir = work / "runs" / f"cap-{name}"
    logs = work / "logs"
    first = run_cli(train_args(config, run_dir, args, cap, "--overwrite_output_dir"), logs / f"train-{name}.log",
                    kill_at_step=args.steps if kill else None, events_dir=run_dir)
    record: dict[str, Any] = {"stage": "train", "cap": name, "cap_gib": cap, "run": first}
    if first["exit_code"] != 0 and not first["killed"] and args.fallback:
        # The automatic plan failed (out of memory, say): keep its record and run once more with the
        # fallback keys set, as a user would after reading the error.
        record["failed_run"] = {**first, "log_tail": tail(Path(first["log"])),
                                "summary": summarize_run(read_events(run_dir)) if (run_dir / "events.jsonl").is_file() else None}
        extra = [item for pair in args.fallback for item in set_flag(*pair)]
        first = run_cli(train_args(config, run_dir, args, cap, "--overwrite_output_dir", *extra), logs / f"train-{name}-fallback.log",
                        kill_at_step=args.steps if kill else None, events_dir=run_dir)
        record.update(run=first, fallback=dict(args.fallback))
    if first["exit_code"] != 0 and not first["killed"]:
        record["log_tail"] = tail(Path(first["log"]))
    events = read_events(run_dir) if (run_dir / "events.jsonl").is_file() else []
    record["summary"] = summarize_run(events) if events else None
    if kill and first["killed"]:
        extra = [item for pair in record.get("fallback", {}).items() for item in set_flag(*pair)]
        resumed = run_cli(train_args(config, run_dir, args, cap, "--resume_from_checkpoint", "latest", *extra),
                          logs / f"resume-{name}.log")
        record["resume_run"] = resumed
        if resumed["exit_code"] != 0:
            record["resume_log_tail"] = tail(Path(resumed["log"]))
        resumed_summary = summarize_run(read_events(run_dir))
        record["resume_summary"] = resumed_summary
        record["resume_losses"] = compare_losses(record["summary"]["losses"], resumed_summary["losses"])
    return record


def parse_caps(text: str) -> list[tuple[str, Optional[float]]]:
    caps = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        caps.append((item, None) if item == "whole" else (f"{float(item):g}", float(item)))
    return caps


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="working folder (checkpoint, clips, caches, runs)")
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--caps", default="whole", help="memory caps in GiB, comma-separated; 'whole' = no cap")
    parser.add_argument("--kill-resume", default="", help="caps (same names) whose run is SIGKILLed and resumed")
    parser.add_argument("--sample-caps", default="", help="caps to run `sample` under with the trained LoRA")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--validation-steps", type=int, default=2, help="denoising steps of the one validation")
    parser.add_argument("--sample-steps", type=int, default=2)
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--frames", type=int, default=93)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--data-resolution", default=None,
                        help="every dataset's `resolution` (e.g. 704x1280; default: the guide's 480, aspect kept), "
                             "with --height/--width the clips' own size")
    parser.add_argument("--skip-prepare", action="store_true", help="reuse the caches (check and cache not rerun)")
    parser.add_argument("--out", type=Path, help="append the JSON lines here too")
    parser.add_argument("--fallback", action="append", default=[], type=lambda text: tuple(text.split("=", 1)),
                        metavar="KEY=VALUE", help="config keys for one retry of a train run that failed")
    parser.add_argument("--set", action="append", default=[], type=lambda text: tuple(text.split("=", 1)),
                        metavar="KEY=VALUE", help="config keys set in every train run (pinned: the plan varies the others)")
    parser.add_argument("--tag", default="", help="suffix of the run names (runs/cap-<cap>-<tag>), e.g. for --set variants")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget: a command still running when it is spent is killed (its partial record is kept)")
    args = parser.parse_args(argv)
    global DEADLINE
    DEADLINE = None if args.budget_s is None else time.perf_counter() + args.budget_s
    args.kill_resume = {name for name, _ in parse_caps(args.kill_resume)}
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"model-{args.size}"

    from importlib.metadata import version

    device, card_gib = gpu_name_and_memory()
    emit(args.out, {"stage": "environment", "size": args.size, "torch": version("torch"), "device": device, "card_gib": card_gib})
    seconds = write_checkpoint(model, args.size)
    emit(args.out, {"stage": "checkpoint_written", "seconds": round(seconds, 1), "path": str(model)})
    config = write_guide_config(work, model, clips=args.clips, frames=args.frames, height=args.height,
                                width=args.width, shrink=args.size == "tiny", resolution=args.data_resolution)
    if not args.skip_prepare:
        check = run_cli(cli("check", "--config", str(config)), work / "logs" / "check.log")
        emit(args.out, {"stage": "check", **check, **({"log_tail": tail(Path(check["log"]))} if check["exit_code"] else {})})
        cache = run_cli(cli("cache", "--config", str(config), "--no-progress"), work / "logs" / "cache.log")
        report = re.search(r"cache: built (\d+) clips.*?; ([\d.]+) s\.", Path(cache["log"]).read_text(errors="replace"))
        built = int(report.group(1)) if report else None
        emit(args.out, {"stage": "cache", **cache, "clips_built": built,
                        "cache_report_s": float(report.group(2)) if report else None,
                        "s_per_clip": round(float(report.group(2)) / built, 2) if report and built else None,
                        **({"log_tail": tail(Path(cache["log"]))} if cache["exit_code"] else {})})
        if cache["exit_code"] != 0:
            return 1
    for name, cap in parse_caps(args.caps):
        emit(args.out, run_cap(name, cap, config, work, args))
    for name, cap in parse_caps(args.sample_caps):
        lora = work / "runs" / f"cap-{name}" / "longcat_lora.safetensors"
        if not lora.is_file():
            lora = next(iter(sorted((work / "runs").glob("cap-*/longcat_lora.safetensors"))), lora)
        start = next(iter(sorted((data_folder(work, args.data_resolution) / "val" / "start-frames").glob("*.png"))))
        flags = ["sample", "--model", str(model), "--lora", str(lora), "--image", str(start),
                 "--prompt", "a red square moves left over a blue background", "--frames", str(args.frames),
                 "--resolution", f"{args.height}x{args.width}", "--steps", str(args.sample_steps),
                 "--output", str(work / "samples" / f"sample-{name}.mp4"), "--overwrite"]
        if cap is not None:
            flags += ["--max-gpu-memory-gib", f"{cap:g}"]
        result = run_cli(cli(*flags), work / "logs" / f"sample-{name}.log")
        emit(args.out, {"stage": "sample", "cap": name, "steps": args.sample_steps, **result,
                        "output_exists": (work / "samples" / f"sample-{name}.mp4").is_file(),
                        **({"log_tail": tail(Path(result["log"]))} if result["exit_code"] else {})})
    return 0


if __name__ == "__main__":
    sys.exit(main())
