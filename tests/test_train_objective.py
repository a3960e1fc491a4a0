"""The image-to-video training objective: condition handling, sign and shift (MODEL.md 4.1, 4.2, 5.1)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longcat_tuner.diffusion.flow import sample_training_sigmas
from longcat_tuner.train.step import (
    FlowBatch,
    compose_condition,
    drop_captions,
    flow_inputs,
    flow_matching_loss,
    training_loss,
)

TINY = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "longcat-tiny"
needs_tiny = pytest.mark.skipif(not TINY.is_dir(), reason=f"tiny reference checkpoint not found at {TINY}")


class Recorder(torch.nn.Module):
    """Stands in for the DiT: records its inputs and predicts `x0 - noise` exactly from them.

    For x_s = (1 - s) x0 + s noise, `x0 - noise = (x0 - x_s) / s`; condition frames (t = 0) get 0.
    """

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0
        self.calls: list[dict] = []
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, latents, timestep, text_embeds, text_mask, *, num_cond_latents=0, kv_cache=None):
        self.calls.append({"latents": latents.clone(), "timestep": timestep.clone(), "num_cond": num_cond_latents})
        sigma = (timestep.float() / 1000).view(timestep.shape[0], 1, -1, 1, 1)
        safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
        prediction = torch.where(sigma > 0, (self.x0 - latents) / safe, torch.zeros_like(latents))
        return prediction * self.scale


def _batch(B=2, T=3, cond=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(B, 16, T, 4, 6, generator=g)
    return FlowBatch(
        latents=latents,
        text_embeds=torch.randn(B, 512, 64, generator=g),
        text_mask=torch.ones(B, 512, dtype=torch.long),
        cond_latents=torch.randn(B, 16, 1, 4, 6, generator=g) if cond else None,
    )


def test_condition_frames_get_timestep_zero_and_stay_clean():
    batch = _batch()
    x0, num_cond = compose_condition(batch.latents, batch.cond_latents)
    model = Recorder(x0)
    training_loss(model, batch, generator=torch.Generator().manual_seed(1), shift=12.0, distribution="uniform")
    call = model.calls[0]
    assert num_cond == 1 and call["num_cond"] == 1
    assert torch.equal(call["timestep"][:, 0], torch.zeros(2))
    assert bool((call["timestep"][:, 1:] > 0).all())
    # Each sample has one timestep for all its noisy frames.
    assert torch.equal(call["timestep"][:, 1:], call["timestep"][:, 1:2].expand(-1, 2))
    # The start-frame latent is fed clean, in place of the clip's own frame 0.
    assert torch.equal(call["latents"][:, :, :1], batch.cond_latents)
    assert not torch.equal(call["latents"][:, :, 1:], batch.latents[:, :, 1:])


def test_sign_and_shift_match_model_md():
    # Training sigmas: u ~ U(0,1) then s = 12 u / (1 + 11 u) (MODEL.md 4.2).
    u = torch.rand(5, generator=torch.Generator().manual_seed(3))
    sigma = sample_training_sigmas(5, shift=12.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sigma, 12 * u / (1 + 11 * u))
    # Noising and target: x_s = (1 - s) x0 + s noise, t = 1000 s, target x0 - noise (MODEL.md 4.1).
    x0, noise = torch.randn(2, 16, 3, 4, 6), torch.randn(2, 16, 3, 4, 6)
    s = torch.tensor([0.3, 0.8])
    model_input, timesteps, target = flow_inputs(x0, noise, s, 1)
    expected = (1 - s.view(2, 1, 1, 1, 1)) * x0 + s.view(2, 1, 1, 1, 1) * noise
    torch.testing.assert_close(model_input[:, :, 1:], expected[:, :, 1:])
    torch.testing.assert_close(timesteps, torch.tensor([[0.0, 300.0, 300.0], [0.0, 800.0, 800.0]]))
    torch.testing.assert_close(target, x0 - noise)
    # A model that predicts x0 - noise exactly has zero training loss ...
    model = Recorder(x0)
    loss = flow_matching_loss(model, x0, noise, s, torch.zeros(2, 512, 64), torch.ones(2, 512), 1)
    assert float(loss.detach()) < 1e-10
    # ... and the sampler, fed the same prediction, walks from noise to x0: training and sampling agree on the sign.
    from longcat_tuner.diffusion.sampler import sample

    start = torch.cat([x0[:, :, :1], noise[:, :, 1:]], dim=2)
    out = sample(Recorder(x0), start, text_embeds=torch.zeros(2, 512, 64), text_mask=torch.ones(2, 512),
                 num_cond_latents=1, steps=4, guidance=1.0, shift=12.0)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


@needs_tiny
def test_gradient_ignores_condition_frame_target():
    from longcat_tuner.model import load_dit
    from longcat_tuner.model.lora import inject_lora

    dit = load_dit(TINY)
    inject_lora(dit, rank=2)
    with torch.no_grad():  # non-zero up weights so every adapter gets a gradient
        for name, p in dit.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    batch = _batch(B=1, T=3)
    batch.text_embeds, batch.text_mask = batch.text_embeds[:, :32], batch.text_mask[:, :32]  # short caption: fast
    x0, num_cond = compose_condition(batch.latents, batch.cond_latents)
    noise = torch.randn_like(x0)
    other = noise.clone()
    other[:, :, 0] = torch.randn_like(other[:, :, 0]) * 10  # changes only the condition frame's target
    sigma = torch.tensor([0.7])
    grads = []
    for n in (noise, other):
        dit.zero_grad()
        loss = flow_matching_loss(dit, x0, n, sigma, batch.text_embeds, batch.text_mask, num_cond)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in dit.named_parameters() if p.requires_grad})
    assert grads[0].keys() and all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
    # Sanity: a change on a noisy frame does change the gradient (the test can fail).
    changed = noise.clone()
    changed[:, :, 1] += 1
    dit.zero_grad()
    flow_matching_loss(dit, x0, changed, sigma, batch.text_embeds, batch.text_mask, num_cond).backward()
    assert any(not torch.equal(grads[0][k], p.grad) for k, p in dit.named_parameters() if p.requires_grad)


def test_text_to_video_and_continuation_use_the_same_step():
    batch = _batch(cond=False, T=4)
    x0, num_cond = compose_condition(batch.latents, None)
    assert num_cond == 0 and torch.equal(x0, batch.latents)
    x0, num_cond = compose_condition(batch.latents, None, continuation_latents=2)
    assert num_cond == 2
    model = Recorder(x0)
    training_loss(model, batch, generator=torch.Generator().manual_seed(0), shift=12.0, distribution="uniform",
                  continuation_latents=2)
    call = model.calls[0]
    assert call["num_cond"] == 2
    assert torch.equal(call["timestep"][:, :2], torch.zeros(2, 2))
    assert torch.equal(call["latents"][:, :, :2], batch.latents[:, :, :2])
    model = Recorder(batch.latents)
    training_loss(model, batch, generator=torch.Generator().manual_seed(0), shift=12.0, distribution="uniform")
    assert model.calls[0]["num_cond"] == 0 and bool((model.calls[0]["timestep"] > 0).all())


def test_caption_dropout_uses_empty_prompt_embedding():
    embeds, mask = torch.randn(4, 512, 8), torch.ones(4, 512, dtype=torch.long)
    empty, empty_mask = torch.randn(1, 512, 8), torch.zeros(1, 512, dtype=torch.long)
    empty_mask[0, 0] = 1
    out, out_mask = drop_captions(embeds, mask, empty, empty_mask, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, empty.expand(4, -1, -1)) and torch.equal(out_mask, empty_mask.expand(4, -1))
    out, out_mask = drop_captions(embeds, mask, empty, empty_mask, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, embeds) and torch.equal(out_mask, mask)
    out, _ = drop_captions(embeds, mask, empty, empty_mask, 0.5, torch.Generator().manual_seed(1))
    dropped = [torch.equal(out[i], empty[0]) for i in range(4)]
    kept = [torch.equal(out[i], embeds[i]) for i in range(4)]
    assert all(d != k for d, k in zip(dropped, kept))


@needs_tiny
def test_lora_step_overfits_one_batch():
    from longcat_tuner.model import load_dit
    from longcat_tuner.model.lora import inject_lora
    from longcat_tuner.runtime.checkpointing import apply_gradient_checkpointing

    dit = load_dit(TINY)
    inject_lora(dit, rank=8)
    apply_gradient_checkpointing(dit)
    dit.train()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 3, 8, 8, generator=g) * 0.5, torch.randn(1, 16, 3, 8, 8, generator=g)
    embeds, mask = torch.randn(1, 32, 64, generator=g), torch.ones(1, 32, dtype=torch.long)  # short caption: fast
    optimizer = torch.optim.AdamW([p for p in dit.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = flow_matching_loss(dit, x0, noise, torch.tensor([0.7]), embeds, mask, 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.15 * losses[0], losses
