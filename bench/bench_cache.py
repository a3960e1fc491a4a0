"""Cache throughput: seconds per clip for decode + VAE encode of 93-frame 480x832 clips. Prints JSON.

The clips are synthetic H.264 sources (default 1080p, 30 fps, 6.3 s: 93 frames at 15 fps), copied under
distinct names and cached through the real VAE stage of `longcat-tuner cache` (`build_latent_cache`:
probe, timestamp selection, threaded decode + resize, decode of the next clip overlapped with encoding,
safetensors write). Reported:
  decode_s_per_clip    decode + resize + crop of one clip alone (CPU)
  encode_s_per_clip    `VideoVAE.encode_posterior` of one decoded clip alone (synchronised), default time chunks
  diffusers_encode_s_per_clip  diffusers' own `AutoencoderKLWan.encode` of the same clip (4-frame chunks): the baseline
  encode_by_chunk      seconds and peak GPU memory per clip for each `--encode_chunks` value (frames per encoder call)
  pipeline_s_per_clip  the cache stage end to end over all clips (the number the target refers to)

  python bench/bench_cache.py                                  # CPU, tiny VAE from ../shared/reference
  python bench/bench_cache.py --device cuda --vae wan --dtype bf16   # full-size Wan2.1 VAE, random weights
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longcat_tuner.config.datasets import parse_datasets  # noqa: E402
from longcat_tuner.data.backends import plan_data  # noqa: E402
from longcat_tuner.data.cache import LazyEncoder, build_latent_cache, channels_last_conv3d, decode_sample  # noqa: E402
from longcat_tuner.data.synthetic import write_video  # noqa: E402
from longcat_tuner.data.video import frames_to_pixels  # noqa: E402
from longcat_tuner.encoders import VideoVAE  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "shared" / "reference" / "longcat-tiny"


def load_vae(kind: str, device: str, dtype: torch.dtype) -> VideoVAE:
    if kind == "tiny":
        if not TINY.is_dir():
            raise SystemExit(f"tiny checkpoint {TINY} missing; use --vae wan")
        return VideoVAE.from_pretrained(TINY, dtype=dtype, device=device)
    # Full-size Wan2.1 VAE (diffusers defaults = the LongCat hub config: base_dim 96, 2 res blocks per
    # level), random weights: the same architecture and cost as the real one.
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    model = AutoencoderKLWan().to(device=device, dtype=dtype).eval().requires_grad_(False)
    return VideoVAE(model, identity="wan2.1-vae-random-init")


def pixels_format(pixels: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if pixels.is_contiguous(memory_format=torch.channels_last_3d) else torch.contiguous_format


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vae", choices=["tiny", "wan"], default="tiny")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--frames", type=int, default=93)
    parser.add_argument("--source", default="1080x1920", help="source HEIGHTxWIDTH of the synthetic clips")
    parser.add_argument("--decode_workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--cudnn_benchmark", type=int, choices=[0, 1], default=None, help="override cuDNN autotuning")
    parser.add_argument("--benchmark_limit", type=int, default=None,
                        help="cuDNN algorithms tried per convolution when autotuning (torch default 10; 0: all)")
    parser.add_argument("--channels_last", action="store_true", help="VAE weights in channels_last_3d layout")
    parser.add_argument("--encode_batch", type=int, default=1, help="also time encoding this many clips in one batch")
    parser.add_argument("--pipeline_only", action="store_true", help="skip the separate encode timing (slow CPU runs)")
    parser.add_argument("--encode_chunks", default="", help="comma-separated frames per encoder call to time, e.g. 4,8,16,32,92")
    parser.add_argument("--chunk", type=int, default=None, help="frames per encoder call for the pipeline (default: the package's)")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    src_h, src_w = (int(v) for v in args.source.split("x"))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_cache_"))
    clips = work / "clips"
    source_frames = round((args.frames - 1) * 2) + 2  # 30 fps source for `frames` frames at 15 fps
    started = time.perf_counter()
    first = write_video(clips / "clip000.mp4", frames=source_frames, fps=30, height=src_h, width=src_w)
    for i in range(1, args.clips):
        shutil.copyfile(first, clips / f"clip{i:03d}.mp4")
    write_s = time.perf_counter() - started

    datasets = parse_datasets([{
        "id": "bench", "dataset_type": "video", "instance_data_dir": str(clips), "caption_strategy": "filename",
        "resolution": 480, "cache_dir_vae": str(work / "cache"), "video": {"num_frames": args.frames, "fps": 15},
    }])
    plan = plan_data(datasets, eval_dataset_id=None, alignment=64)
    sample = plan.train[0].samples[0]
    vae = load_vae(args.vae, args.device, dtype)
    if args.cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    if args.benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = args.benchmark_limit
    if args.channels_last:
        channels_last_conv3d(vae.model)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    started = time.perf_counter()
    frames = decode_sample(sample)
    decode_s = time.perf_counter() - started
    pixels = frames_to_pixels(frames, vae.device)
    if args.channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last_3d)
    cuda = args.device.startswith("cuda")

    def timed(fn) -> tuple[float, Optional[float]]:
        fn()  # warm-up (cuDNN autotuning, allocator)
        sync()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        fn()
        sync()
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
        return round(time.perf_counter() - started, 3), peak

    encode_s = diffusers_s = None
    by_chunk = []
    vae.encode_chunk_frames = args.chunk
    if not args.pipeline_only:
        diffusers_s, _ = timed(lambda: vae.model.encode(pixels.to(vae.dtype)).latent_dist.mean)
        for chunk in (int(c) for c in args.encode_chunks.split(",") if c.strip()):
            vae.encode_chunk_frames = chunk
            seconds, peak = timed(lambda: vae.encode_posterior(pixels))
            by_chunk.append({"chunk_frames": chunk, "encode_s": seconds, "peak_gpu_mem_gib": peak})
            print(json.dumps(by_chunk[-1]), flush=True)
        vae.encode_chunk_frames = args.chunk
        encode_s, _ = timed(lambda: vae.encode_posterior(pixels))
    batched_s = None
    if args.encode_batch > 1 and not args.pipeline_only:
        batch = pixels.expand(args.encode_batch, *pixels.shape[1:]).contiguous(memory_format=pixels_format(pixels))
        vae.encode_posterior(batch)
        sync()
        started = time.perf_counter()
        vae.encode_posterior(batch)
        sync()
        batched_s = round((time.perf_counter() - started) / args.encode_batch, 3)

    started = time.perf_counter()
    report = build_latent_cache(plan, datasets, vae=LazyEncoder.of(vae), dtype=dtype, progress=False, decode_workers=args.decode_workers)
    sync()
    pipeline_s = time.perf_counter() - started
    if report.failed or report.built["clip"] != args.clips:
        raise SystemExit(f"cache stage failed: {report.failed}")
    result = {
        "bench": "cache",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "vae": args.vae,
        "dtype": args.dtype,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_benchmark_limit": torch.backends.cudnn.benchmark_limit,
        "channels_last": args.channels_last,
        "clips": args.clips,
        "bucket": str(sample.bucket),
        "latents": [16, sample.bucket.latent_frames, sample.bucket.height // 8, sample.bucket.width // 8],
        "source": f"{src_h}x{src_w} H.264 30 fps, {source_frames} frames",
        "decode_s_per_clip": round(decode_s, 3),
        "encode_s_per_clip": encode_s,
        "encode_chunk_frames": vae.chunk_frames_for(1, args.frames, sample.bucket.height, sample.bucket.width),
        "diffusers_encode_s_per_clip": diffusers_s,
        "encode_by_chunk": by_chunk,
        "pipeline_s_per_clip": round(pipeline_s / args.clips, 3),
        "encode_s_per_clip_batched": batched_s,
        # The first clip's decode cannot overlap an encode; steady state is the rest.
        "pipeline_steady_s_per_clip": round((pipeline_s - decode_s) / args.clips, 3),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device.startswith("cuda") else None,
        "source_write_s": round(write_s, 2),
    }
    print(json.dumps(result))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
