"""`ImageTrainConfig`: what `graftlm train-image` does (no torch here: the CLI builds its flags
from these fields)."""

from __future__ import annotations

import dataclasses

from graftlm.errors import GraftError
from graftlm.image.presets import PRESETS


@dataclasses.dataclass(frozen=True)
class ImageTrainConfig:
    """What `graftlm train-image` does.

    Attributes:
        base: a diffusers Stable Diffusion pipeline folder (model_index.json, unet/, vae/, ...).
        images: the folder of training images.
        out: where the LoRA file, metrics.jsonl and loss.png go.
        prompt: instance prompt for images without a caption.
        rank: LoRA rank.
        alpha: LoRA alpha (scale alpha / rank).
        targets: a preset of graftlm.image.presets ("attention", "attention+conv", "all").
        steps: optimizer steps.
        lr: AdamW learning rate.
        batch_size: images per step.
        resolution: image side in pixels (default: what the UNet's sample size decodes to).
        seed: seeds noise, timesteps and batches.
        save_every: write a resumable checkpoint (OUT/checkpoint) every N steps.
        resume: continue from OUT/checkpoint (the same settings), to the same numbers.
    """

    base: str
    images: str
    out: str
    prompt: str | None = None
    rank: int = 4
    alpha: float = 4.0
    targets: str = "attention"
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 1
    resolution: int | None = None
    seed: int = 0
    save_every: int = 50
    resume: bool = False

    def __post_init__(self) -> None:
        if self.targets not in PRESETS:
            raise GraftError(f"targets {self.targets!r}: choose one of {sorted(PRESETS)}")
        for field in ("rank", "steps", "batch_size", "save_every"):
            if getattr(self, field) < 1:
                raise GraftError(
                    f"{field} must be a positive integer, got {getattr(self, field)!r}"
                )
        if not self.lr > 0:
            raise GraftError(f"lr must be positive, got {self.lr!r}")
