"""What the loop eats: batches of cached latents, plus the fixed inputs of validation.

`prepare_data` runs the cache stage (`longcat_tuner.data.build_caches`: text encoder and VAE are used
there, never in the loop), then builds the bucketed sampler over the cached training samples, the
empty-prompt embedding for caption dropout, the validation items (eval split start frames + captions)
and the held-out batches. `TrainingData.to_flow_batch` turns a list of sample indices into a
`FlowBatch`, drawing the posterior samples from the trainer's generator so a resumed run draws the same.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from longcat_tuner.config.training import TrainConfig
from longcat_tuner.data.dataset import CachedVideoDataset, collate_samples, sample_posterior
from longcat_tuner.devices import default_dtype
from longcat_tuner.errors import ConfigError, DataError
from longcat_tuner.train.parallel import SingleProcess
from longcat_tuner.train.step import FlowBatch, drop_captions
from longcat_tuner.data.buckets import continuation_problem, resolution_size, unbatched_warning
from longcat_tuner.data.images import prepare_start_frame, read_image
from longcat_tuner.media import image_to_tensor
from longcat_tuner.train.validate import ValidationItem

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainingData:
    """Everything the loop and validation read; the sampler's position is part of each checkpoint."""

    dataset: CachedVideoDataset  # the training datasets' cached samples
    sampler: Any  # BucketBatchSampler over `dataset`
    device: torch.device
    empty_embeds: torch.Tensor  # [1, L, C]
    empty_mask: torch.Tensor  # [1, L]
    negative_embeds: torch.Tensor
    negative_mask: torch.Tensor
    vae: Any = None
    validation_items: list[ValidationItem] = dataclasses.field(default_factory=list)
    heldout_batches: list[FlowBatch] = dataclasses.field(default_factory=list)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.sampler)

    def batches(self) -> Iterator[list[int]]:
        """Index lists forever; the sampler moves to the next epoch (new shuffle) by itself."""
        while True:
            yielded = False
            for indices in self.sampler:
                yielded = True
                yield indices
            if not yielded and len(self.sampler) == 0:
                raise DataError("the data sampler yields no batch; add data or lower train_batch_size")

    def to_flow_batch(self, indices: list[int], *, generator: torch.Generator, caption_dropout: float) -> FlowBatch:
        """Stack cached tensors, sample the posteriors, apply caption dropout; tensors on the device."""
        batch = collate_samples([self.dataset[i] for i in indices])
        latents = sample_posterior(batch["latents_mean"], batch["latents_std"], generator)
        cond = None
        if batch["cond_mean"] is not None:
            cond = sample_posterior(batch["cond_mean"], batch["cond_std"], generator)
        embeds, mask = drop_captions(
            batch["text_embeds"].float(), batch["text_mask"], self.empty_embeds, self.empty_mask, caption_dropout, generator
        )
        return FlowBatch(
            latents=latents.to(self.device), text_embeds=embeds.to(self.device), text_mask=mask.to(self.device),
            cond_latents=cond.to(self.device) if cond is not None else None,
        )


def encoder_settings(device: torch.device) -> torch.dtype:
    """Encoders run in bf16 on CUDA (as the official demos load them) and fp32 on the CPU."""
    return default_dtype(device)


def prepare_data(
    config: TrainConfig, *, device: torch.device, progress: bool = True, parallel: Optional[SingleProcess] = None
) -> TrainingData:
    """Cache stage, sampler, empty-prompt embedding, validation items and held-out batches.

    Multi-GPU (`parallel`): the writer builds the caches while the others wait, then they read the finished
    files (so no two ranks write one entry); each rank's sampler takes its share of every epoch's
    batches; validation inputs are prepared on the ranks that validate (`parallel.validates`).
    """
    parallel = parallel or SingleProcess()
    from longcat_tuner.data.buckets import BucketBatchSampler
    from longcat_tuner.config.datasets import load_datasets
    from longcat_tuner.data.cache import build_caches

    if not Path(config.data_backend_config).is_file():
        raise ConfigError(
            f"data_backend_config: {config.data_backend_config} does not exist; "
            "copy config/multidatabackend.json.example there and fill the folders"
        )
    datasets = load_datasets(config.data_backend_config)
    problem = datasets.output_dir_problem(Path(config.output_dir))
    if problem:  # before anything is cached, trained or written there
        raise ConfigError(problem)
    # The eval split is cached even without dataset validation: it feeds the held-out loss.
    eval_id = config.eval_dataset_id
    dtype = encoder_settings(device)
    with parallel.writer_first():
        index = build_caches(
            datasets, model_root=config.pretrained_model_name_or_path, eval_dataset_id=eval_id,
            alignment=config.aspect_bucket_alignment, seed=config.seed, device=device, encoder_dtype=dtype,
            cache_dtype=default_dtype(device), progress=progress and parallel.is_writer,
        )
    dataset = CachedVideoDataset(index.train, index.empty_text_path)
    problem = continuation_problem(
        ((s.dataset_id, s.bucket[0], s.cond_path is not None) for s in index.train + index.eval),
        config.video_continuation_latents,
    )
    if problem:  # every such batch would stop the run at its step (the held-out loss at each validation)
        raise ConfigError(problem)
    if len({key[-1] for key in dataset.group_keys()}) > 1:
        log.info("training mixes clips with and without start frames (image-to-video and text-to-video)")
    sampler = BucketBatchSampler(
        dataset.group_keys(), config.train_batch_size, seed=config.seed, repeats=dataset.repeats(), drop_last=True,
        rank=parallel.data_rank, world_size=parallel.data_world_size,
    )
    unbatched = sampler.unbatched_groups()
    if unbatched:
        parallel.say(unbatched_warning(unbatched, config.train_batch_size))
    empty_embeds, empty_mask = (t[None] for t in dataset.empty_text())
    empty_embeds = empty_embeds.float()
    if not parallel.validates:  # no validation inputs (text encoder, VAE, start frames) on this rank
        return TrainingData(dataset=dataset, sampler=sampler, device=device, empty_embeds=empty_embeds,
                            empty_mask=empty_mask, negative_embeds=empty_embeds, negative_mask=empty_mask)

    text_encoder = None
    needs_text = bool(config.validation_negative_prompt) or not config.validation_using_datasets
    if needs_text:
        from longcat_tuner.encoders import TextEncoder

        text_encoder = TextEncoder.from_pretrained(config.pretrained_model_name_or_path, dtype=dtype, device=device)
    if config.validation_negative_prompt:
        negative_embeds, negative_mask = (t.cpu() for t in text_encoder.encode([config.validation_negative_prompt]))
        negative_embeds = negative_embeds.float()
    else:
        negative_embeds, negative_mask = empty_embeds, empty_mask

    items = validation_items(config, CachedVideoDataset(index.eval, index.empty_text_path), text_encoder)
    del text_encoder  # not needed in the loop; frees its memory before the DiT loads
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand umT5's blocks back: the DiT and the memory cap start from a clean pool
    vae = None
    if items:
        from longcat_tuner.encoders import VideoVAE

        vae = VideoVAE.from_pretrained(config.pretrained_model_name_or_path, dtype=dtype, device=device)
    heldout = []
    eval_set = CachedVideoDataset(index.eval[: config.validation_max_samples], index.empty_text_path)
    for position in range(len(eval_set)):
        item = collate_samples([eval_set[position]])
        # The posterior mean: no randomness, so held-out losses are comparable across validations.
        heldout.append(FlowBatch(
            latents=item["latents_mean"].float().to(device), text_embeds=item["text_embeds"].float().to(device),
            text_mask=item["text_mask"].to(device),
            cond_latents=item["cond_mean"].float().to(device) if item["cond_mean"] is not None else None,
        ))
    return TrainingData(
        dataset=dataset, sampler=sampler, device=device, empty_embeds=empty_embeds, empty_mask=empty_mask,
        negative_embeds=negative_embeds, negative_mask=negative_mask, vae=vae, validation_items=items,
        heldout_batches=heldout,
    )


def validation_items(config: TrainConfig, eval_set: CachedVideoDataset, text_encoder: Any) -> list[ValidationItem]:
    """Eval-split start frames + captions (image-to-video), or `validation_prompt` (text-to-video)."""
    items = []
    if config.validation_using_datasets:
        if not len(eval_set):
            raise DataError(
                f"eval split '{config.eval_dataset_id}' has no usable sample for validation; "
                "run `longcat-tuner check` or set validation_using_datasets to false"
            )
        for position in range(min(len(eval_set), config.validation_max_samples)):
            sample = eval_set[position]
            start = None
            if sample["cond_media_path"]:
                image = read_image(sample["cond_media_path"])  # EXIF-rotated, as the cache saw it
                height, width = resolution_size(
                    config.validation_resolution, (image.height, image.width), config.aspect_bucket_alignment
                )
                start = image_to_tensor(prepare_start_frame(image, height, width))
            elif not isinstance(_fixed_size(config), tuple):
                raise ConfigError(
                    f"eval sample {sample['sample_id']} has no start frame, so validation_resolution must be "
                    f"HEIGHTxWIDTH (got '{config.validation_resolution}')"
                )
            items.append(ValidationItem(
                name=sample["sample_id"].rsplit("/", 1)[-1], prompt=sample["caption"],
                text_embeds=sample["text_embeds"][None].float(), text_mask=sample["text_mask"][None], start_frame=start,
                size=_fixed_size(config) if start is None else None,
            ))
        return items
    if not config.validation_prompt:
        return []
    size = _fixed_size(config)
    if not isinstance(size, tuple):
        raise ConfigError(
            "text-to-video validation (validation_using_datasets: false) needs validation_resolution as "
            f"HEIGHTxWIDTH, got '{config.validation_resolution}'"
        )
    embeds, mask = text_encoder.encode([config.validation_prompt])
    return [ValidationItem(name="prompt", prompt=config.validation_prompt, text_embeds=embeds.float().cpu(),
                           text_mask=mask.cpu(), start_frame=None, size=size)]


def _fixed_size(config: TrainConfig) -> Any:
    from longcat_tuner.config.resolution import parse_resolution

    return parse_resolution(config.validation_resolution)
