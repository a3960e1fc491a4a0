"""Video ingestion: probe a clip, pick frames by timestamp at the target fps, decode, resize, crop.

Why PyAV (not torchcodec): PyAV ships self-contained wheels with their own FFmpeg on every platform we
support (torchcodec needs a system FFmpeg of a matching major version and a torch build it was compiled
against), it exposes packet timestamps without decoding (`demux`), so probing a clip's exact frame
times is cheap even for 4K sources, and `VideoFrame.reformat` scales each frame inside swscale right
after it is decoded, so a 4K clip never has more than one full-resolution frame in memory.

Frame selection by timestamp: output frame i is the source frame on screen at t_i = start + i / fps,
i.e. the last frame whose presentation time is <= t_i. A 30 fps source at 15 fps gives source frames
0, 2, 4, ...; a variable-rate source gives the frames a viewer would see at those instants.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from longcat_tuner.errors import DataError

# Presentation times are rationals rounded to float; this slack keeps t_i == pts from missing the frame.
TIME_EPSILON = 1e-6
# Containers with a coarse time base store each timestamp rounded to a tick (Matroska / WebM: 1 ms, so a
# 15 fps frame due at 533.33 ms is stored at 533 ms). Up to one tick (at most this many seconds) of slack
# counts such a frame as on time; without it a 9-frame 15 fps .mkv clip counted only 8 frames.
MAX_TICK_SLACK = 0.002


@dataclass(frozen=True)
class VideoInfo:
    """What selection and bucketing need to know about a clip, read without decoding."""

    path: Path
    width: int  # as displayed (rotation applied)
    height: int
    rotation: int  # degrees counterclockwise applied for display (0, 90, -90, 180)
    frame_pts: tuple[int, ...]  # presentation timestamps in stream time-base units, sorted
    time_base: float

    @property
    def frame_times(self) -> list[float]:
        """Seconds since the first frame, in presentation order."""
        first = self.frame_pts[0]
        return [(pts - first) * self.time_base for pts in self.frame_pts]

    @property
    def source_fps(self) -> float:
        times = self.frame_times
        return (len(times) - 1) / times[-1] if len(times) > 1 and times[-1] > 0 else 0.0

    @property
    def time_slack(self) -> float:
        """How early a stored timestamp may be against the true one: one tick of the time base (capped)."""
        return max(TIME_EPSILON, min(self.time_base, MAX_TICK_SLACK))


@dataclass(frozen=True)
class ResizePlan:
    """Scale a source of (src_height, src_width) to (scaled_height, scaled_width), then crop a window."""

    scaled_height: int
    scaled_width: int
    top: int
    left: int
    height: int
    width: int


def plan_resize(
    src_height: int,
    src_width: int,
    height: int,
    width: int,
    *,
    crop: bool = True,
    crop_fraction: tuple[float, float] = (0.5, 0.5),
) -> ResizePlan:
    """Aspect-preserving scale that covers (height, width), then a crop at `crop_fraction` of the overflow.

    `crop_fraction` (vertical, horizontal) in [0, 1]: (0.5, 0.5) is a center crop. With `crop=False` the
    source is stretched to the target (no crop, aspect changes). The geometry is the official pipeline's
    (diffusers' resize-and-crop): the side that binds is scaled to the target exactly, the other side is
    rounded down (never below the target), and a center crop starts at scaled // 2 - target // 2. Start
    frames and clips share it, so a start frame and its clip's first frame line up pixel for pixel.
    """
    if not crop:
        return ResizePlan(height, width, 0, 0, height, width)
    if width * src_height > src_width * height:  # the target is wider than the source: the width binds
        scaled_height, scaled_width = max(height, src_height * width // src_width), width
    else:
        scaled_height, scaled_width = height, max(width, src_width * height // src_height)
    top = _crop_offset(scaled_height, height, crop_fraction[0])
    left = _crop_offset(scaled_width, width, crop_fraction[1])
    return ResizePlan(scaled_height, scaled_width, top, left, height, width)


def _crop_offset(scaled: int, target: int, fraction: float) -> int:
    """Start of the crop window: centered as the official pipeline centers it, else at `fraction` of the overflow."""
    if fraction == 0.5:
        return scaled // 2 - target // 2
    return round(fraction * (scaled - target))


def _open(path: Path):
    import av

    try:
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (0 bytes), e.g. an interrupted copy; copy it again or remove it")
        return av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable video ({getattr(err, 'strerror', None) or err}); re-encode or remove it") from None


def probe_video(path: str | Path) -> VideoInfo:
    """Read a clip's size, rotation and every frame's timestamp by demuxing packets.

    Only the first frame is decoded (to prove the stream decodes and to read its display rotation).
    """
    import av

    path = Path(path)
    with _open(path) as container:
        if not container.streams.video:
            raise DataError(f"{path}: has no video stream; remove it or convert it to a video")
        stream = container.streams.video[0]
        if stream.codec_context is None:  # a damaged header: the stream is typed video but names no codec
            raise DataError(f"{path}: the video stream names no codec (a damaged file header); re-encode or remove it")
        if stream.time_base is None:
            raise DataError(f"{path}: video stream has no time base; re-encode it (e.g. ffmpeg -i in -c:v libx264 out.mp4)")
        pts: list[int] = []
        untimed = 0  # packets with data but no presentation time (a raw elementary stream)
        rotation: Optional[int] = None
        try:
            for packet in container.demux(stream):
                if packet.pts is None or packet.size == 0:
                    untimed += packet.pts is None and packet.size > 0
                    continue
                # A clip trimmed without re-encoding (`ffmpeg -ss ... -c copy`, LosslessCut, QuickTime) keeps the
                # frames before the cut, flagged discard by its edit list: they decode (the first shown frame
                # needs its keyframe) but are never output, so they are not frames of the clip.
                if not getattr(packet, "is_discard", False):
                    pts.append(packet.pts)
                if rotation is None:
                    # Decode until the first frame: proves the stream decodes and gives the display
                    # rotation (phone videos), which PyAV reports per frame only.
                    for frame in packet.decode():
                        rotation = int(round(getattr(frame, "rotation", 0) or 0))
                        break
            if rotation is None and pts:  # decoder delay (B-frames): flush to get the first frame
                for frame in stream.codec_context.decode(None):
                    rotation = int(round(getattr(frame, "rotation", 0) or 0))
                    break
        except av.error.FFmpegError as err:
            raise DataError(f"{path}: corrupt video data ({err}); re-encode or remove it") from None
        pts.sort()
        # Read everything from the stream before the container closes (its memory is freed then).
        width, height = stream.codec_context.width, stream.codec_context.height
        time_base = float(stream.time_base)
    if pts and rotation is None:
        raise DataError(f"{path}: no frame of the video stream decodes; the file is corrupt, re-encode or remove it")
    rotation = rotation or 0
    if not pts and untimed:
        raise DataError(
            f"{path}: the video frames carry no timestamps (a raw H.264/HEVC stream rather than a video file?); "
            "put it in a container at its frame rate, e.g. `ffmpeg -framerate 30 -i in.h264 -c copy out.mp4`"
        )
    if not pts:
        raise DataError(f"{path}: no video frames found; the file is empty or truncated")
    if width <= 0 or height <= 0:
        raise DataError(f"{path}: video stream reports size {width}x{height}; re-encode it")
    if rotation % 180:
        width, height = height, width
    return VideoInfo(path, width, height, rotation, tuple(pts), time_base)


def available_frames(frame_times: Sequence[float], fps: float, *, start: float = 0.0, slack: float = TIME_EPSILON) -> int:
    """How many output frames at `fps` fit: those with start + i/fps <= the last frame's time (+ `slack`,
    the timestamps' rounding: `VideoInfo.time_slack`)."""
    if not frame_times or start > frame_times[-1] + slack:
        return 0
    return int(math.floor((frame_times[-1] + slack - start) * fps)) + 1


def select_frame_indices(
    frame_times: Sequence[float], fps: float, num_frames: int, *, start: float = 0.0, slack: float = TIME_EPSILON
) -> list[int]:
    """Indices (presentation order) of the source frames shown at t_i = start + i/fps, i < num_frames
    (a frame stored up to `slack` seconds late counts as on screen at t_i).

    Raises `DataError` when the clip is too short for `num_frames` frames.
    """
    have = available_frames(frame_times, fps, start=start, slack=slack)
    if have < num_frames:
        raise DataError(
            f"clip has {have} frames at {fps:g} fps but {num_frames} are needed; lower video.num_frames, "
            "set video.min_frames, or remove the clip"
        )
    indices = []
    for i in range(num_frames):
        t = start + i / fps
        indices.append(max(0, bisect.bisect_right(frame_times, t + slack) - 1))
    return indices


def decode_frames(
    path: str | Path,
    info: VideoInfo,
    indices: Sequence[int],
    plan: ResizePlan,
    *,
    interpolation: str = "AREA",
) -> np.ndarray:
    """Decode the frames at `indices` (into `info.frame_pts`), resized and cropped per `plan`.

    Returns uint8 [F, height, width, 3]. Frames are matched by presentation timestamp, scaled by swscale
    as they come out of the (threaded) decoder, and decoding stops after the last wanted frame.
    """
    import av

    path = Path(path)
    wanted: dict[int, list[int]] = {}
    for position, index in enumerate(indices):
        wanted.setdefault(info.frame_pts[index], []).append(position)
    last_pts = max(wanted)
    out = np.empty((len(indices), plan.height, plan.width, 3), dtype=np.uint8)
    filled = 0
    # Rotation by 90 degrees swaps the axes: scale to the pre-rotation shape, then rotate.
    turns = (info.rotation // 90) % 4
    scale_w, scale_h = (plan.scaled_height, plan.scaled_width) if turns % 2 else (plan.scaled_width, plan.scaled_height)
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame + slice threads: 4K H.264 decodes several times faster
        try:
            for frame in container.decode(stream):
                if frame.pts is None or frame.pts not in wanted:
                    if frame.pts is not None and frame.pts > last_pts:
                        break
                    continue
                rgb = frame.reformat(width=scale_w, height=scale_h, format="rgb24", interpolation=interpolation).to_ndarray()
                if turns:
                    rgb = np.rot90(rgb, k=turns)
                window = rgb[plan.top : plan.top + plan.height, plan.left : plan.left + plan.width]
                for position in wanted.pop(frame.pts):
                    out[position] = window
                    filled += 1
                if not wanted:
                    break
        except av.error.FFmpegError as err:
            raise DataError(f"{path}: decoding failed after {filled} of {len(indices)} frames ({err}); re-encode or remove it") from None
    if wanted:
        raise DataError(
            f"{path}: {len(indices) - filled} of {len(indices)} wanted frames could not be decoded "
            "(truncated or corrupt file); re-encode or remove it"
        )
    return out


def frames_to_pixels(frames: np.ndarray, device=None):
    """uint8 [F, H, W, 3] -> float32 tensor [1, 3, F, H, W] in [-1, 1] (the VAE's input range).

    With `device`, the uint8 frames are moved first and converted there (4x less to copy to a GPU).
    """
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(frames))
    if device is not None:
        tensor = tensor.to(device, non_blocking=True)
    tensor = tensor.permute(3, 0, 1, 2).float()
    return (tensor / 127.5 - 1.0).unsqueeze(0)


def clip_frame_count(available: int, num_frames: int, min_frames: Optional[int], max_frames: Optional[int]) -> Optional[int]:
    """Frames a clip trains with: num_frames if it has them, else (a clip of at least min_frames) the largest 1+4k
    count it has, else None. A min_frames that is not 1+4k (7) keeps a 7-frame clip as 5 frames, as the key's
    description says: it used to be skipped as "too short: 7 frames ..., 7 needed"."""
    if max_frames is not None:
        available = min(available, max_frames)
    if available >= num_frames:
        return num_frames
    if min_frames is None or available < max(1, min_frames):
        return None
    return available - (available - 1) % 4
