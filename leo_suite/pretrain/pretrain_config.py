"""The settings of a pretraining run (`PretrainConfig`) and their checks."""

import dataclasses

from leo_suite import errors
from leo_suite.models import backbones

AUGMENTS = ("none", "shift", "shift_flip", "affine")
HEADS = ("linear", "cosine")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """Everything that defines a pretraining run (saved beside its checkpoints)."""
  backbone: str = "conv4"
  image_size: int = 28
  channels: int = 1
  invert: bool = True          # Omniglot: black strokes on white -> 1 - x
  rotations: bool = True       # 90/180/270-degree copies as new classes
  epochs: int = 12
  batch_size: int = 64
  learning_rate: float = 0.05
  schedule: str = "cosine"     # "cosine" or "step" (x0.1 at 60% and 80%)
  warmup_steps: int = 0
  momentum: float = 0.9
  weight_decay: float = 5e-4   # L2 on conv/dense kernels
  augment: str = "shift"       # "none", "shift" (random translation), "shift_flip",
                               # "affine" (Koch et al. 2015 affine warp + translation)
  max_shift: int = 2
  head: str = "linear"         # "linear" or "cosine" (scale * cos, learnable scale)
  dropout: float = 0.0
  seed: int = 0
  mixed_precision: str = "auto"  # "auto" (on a GPU only), "off", "on" (needs a GPU)
  checkpoint_every: int = 0    # steps between checkpoints (0: once per epoch)
  log_every: int = 20
  # Born-again distillation (Furlanello et al. 2018; Tian et al. 2020, RFS):
  # the pretraining run directory of a finished teacher ("" = none); the loss
  # becomes (1 - alpha) * CE + alpha * T^2 * KL(p_teacher^T || p_student^T).
  teacher: str = ""
  distill_alpha: float = 0.5
  distill_temperature: float = 4.0


def validate_config(config: PretrainConfig):
  if config.backbone not in backbones.BACKBONES:
    raise errors.ConfigError(
        f"--backbone={config.backbone!r} is unknown; choose one of {list(backbones.BACKBONES)}")
  checks = [
      (config.image_size >= 16, f"--image_size={config.image_size} must be >= 16"),
      (config.channels in (1, 3), f"--channels={config.channels} must be 1 or 3"),
      (config.epochs >= 1, f"--epochs={config.epochs} must be >= 1"),
      (config.batch_size >= 1, f"--batch_size={config.batch_size} must be >= 1"),
      (config.learning_rate > 0, f"--learning_rate={config.learning_rate} must be > 0"),
      (config.schedule in ("cosine", "step"), f"--schedule={config.schedule!r}: use cosine or step"),
      (config.augment in AUGMENTS,
       f"--augment={config.augment!r}: use one of {list(AUGMENTS)}"),
      (config.head in HEADS, f"--head={config.head!r}: use one of {list(HEADS)}"),
      (config.mixed_precision in ("auto", "on", "off"),
       f"--mixed_precision={config.mixed_precision!r}: use auto, on or off"),
      (0.0 <= config.dropout < 1.0, f"--dropout={config.dropout} must be in [0, 1)"),
      (0.0 <= config.distill_alpha <= 1.0,
       f"--distill_alpha={config.distill_alpha} must be in [0, 1]"),
      (config.distill_temperature > 0,
       f"--distill_temperature={config.distill_temperature} must be > 0"),
  ]
  for ok, message in checks:
    if not ok:
      raise errors.ConfigError(message)
