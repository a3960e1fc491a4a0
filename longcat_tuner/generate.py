"""End-to-end generation: start frame + prompt -> video, used by `longcat-tuner sample` and validation.

Mirrors the official `generate_i2v` / `generate_t2v`: the start frame is resized and cropped to the target
size, VAE-encoded (a posterior sample, as the official code does) into latent frame 0, the other latents
are Gaussian noise, and the Euler/CFG-Zero* loop denoises only the noisy frames.

Progress (`SamplingProgress`): one report per denoising step, then a "decoding" phase before the VAE decode
(which can take as long as the denoising), so a bar never sits at 40/40 while the decode runs. A reporter may
end the sampling at a step boundary (Ctrl-C during validation) by raising `SamplingStopped`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch

from longcat_tuner.config.datasets import MIN_I2V_FRAMES
from longcat_tuner.diffusion.sampler import sample
from longcat_tuner.errors import ShapeError
from longcat_tuner.media import check_frames


DENOISING, DECODING, DONE = "denoising", "decoding", "done"
# report(phase, denoise_step, of): after each denoising step, before the decode, after it.
ProgressReport = Callable[[str, int, int], None]


class SamplingStopped(Exception):
    """Sampling was ended at a step boundary because a stop was requested (see `SamplingProgress`)."""


class SamplingProgress:
    """What `generate` reports while it runs: a console bar (tqdm on stderr) labelled `label`, and `report`
    (events, JSON lines) per phase. `should_stop()` is asked after each denoising step and before the
    decode; when it says yes the sampling raises `SamplingStopped` there."""

    def __init__(self, *, label: str = "sampling", bar: bool = True, report: Optional[ProgressReport] = None,
                 should_stop: Optional[Callable[[], bool]] = None) -> None:
        self.label, self.show_bar = label, bar
        self.report = report or (lambda phase, step, of: None)
        self.should_stop = should_stop or (lambda: False)
        self._bar: Any = None

    def step(self, done: int, total: int) -> None:
        if self.show_bar and self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=done - 1, desc=self.label, unit="step", dynamic_ncols=True, leave=False)
        if self._bar is not None:
            self._bar.update(1)
        self.report(DENOISING, done, total)
        self._check(f"after denoising step {done}/{total}")

    def decoding(self, total: int) -> None:
        self._check("before the VAE decode")
        if self._bar is not None:
            self._bar.set_description(f"{self.label}: decoding")
            self._bar.refresh()
        self.report(DECODING, total, total)

    def done(self, total: int) -> None:
        self.close()
        self.report(DONE, total, total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _check(self, where: str) -> None:
        if self.should_stop():
            self.close()
            raise SamplingStopped(f"{self.label} stopped {where}")


@dataclasses.dataclass
class GenerationResult:
    latents: torch.Tensor  # [1, 16, T, h, w] normalised latents after sampling
    cond_latents: Optional[torch.Tensor]  # [1, 16, 1, h, w] the encoded start frame (I2V) or None
    video: torch.Tensor  # [3, F, H, W] in [-1, 1]
    finite: bool = True  # False when the sampled latents hold NaN or inf (the video is then black or noise)


def check_i2v_frames(frames: int) -> None:
    """Image-to-video keeps the start frame as latent frame 0: 1-4 frames make only that one latent."""
    if frames < MIN_I2V_FRAMES:
        raise ShapeError(
            f"image-to-video needs at least {MIN_I2V_FRAMES} frames, got {frames}: the start frame is the first latent "
            f"frame and 1-{MIN_I2V_FRAMES - 1} frames make only that one, leaving nothing to generate; use "
            f"{MIN_I2V_FRAMES} or more (`sample --frames`, validation_num_video_frames)"
        )


def generate(
    dit,
    vae,
    *,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor,
    negative_embeds: Optional[torch.Tensor],
    negative_mask: Optional[torch.Tensor],
    height: int,
    width: int,
    frames: int,
    start_frame: Optional[torch.Tensor] = None,
    steps: int = 50,
    guidance: float = 4.0,
    shift: float = 12.0,
    distilled: bool = False,
    seed: int = 0,
    callback: Optional[Callable[[int, int, torch.Tensor], None]] = None,
    progress: Optional[SamplingProgress] = None,
) -> GenerationResult:
    """`start_frame` `[3, H, W]` in [-1, 1] gives image-to-video; None gives text-to-video. `callback(step,
    steps, latents)` runs after each denoising step; `progress` reports the steps and the decode and may stop
    the sampling (`SamplingStopped`)."""
    check_frames(frames)
    if start_frame is not None:
        check_i2v_frames(frames)
    if height % 16 or width % 16:
        raise ShapeError(f"size {height}x{width}: height and width must be divisible by 16")
    device = next(dit.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    latent_frames = 1 + (frames - 1) // 4
    shape = (1, 16, latent_frames, height // 8, width // 8)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    cond = None
    if start_frame is not None:
        if tuple(start_frame.shape[-2:]) != (height, width):
            raise ShapeError(f"start frame is {tuple(start_frame.shape[-2:])}, expected {(height, width)}")
        pixels = start_frame.reshape(1, 3, 1, height, width)
        cond = vae.encode(pixels, sample=True, generator=torch.Generator(device=vae.device).manual_seed(seed)).float()
        latents[:, :, :1] = cond.to(device)
    progress = progress or SamplingProgress(bar=False)

    def after_step(step: int, total: int, current: torch.Tensor) -> None:
        if callback is not None:
            callback(step, total, current)
        progress.step(step, total)

    try:
        out = sample(
            dit, latents, text_embeds=text_embeds, text_mask=text_mask, negative_embeds=negative_embeds,
            negative_mask=negative_mask, num_cond_latents=1 if cond is not None else 0, steps=steps,
            guidance=guidance, shift=shift, distilled=distilled, callback=after_step,
        )
        finite = bool(torch.isfinite(out).all())
        progress.decoding(steps)
        video = vae.decode(out)[0]
    finally:
        progress.close()
    progress.done(steps)
    return GenerationResult(latents=out, cond_latents=cond, video=video, finite=finite)
