"""Drop-in subclasses of TRL's ``GRPOConfig`` and ``GRPOTrainer`` with a ``kl_mode`` field.

    from kl_patches.integrations.trl import GRPOConfig, GRPOTrainer
    args = GRPOConfig(..., beta=0.04)                       # kl_mode defaults to k1-rtg-loss
    trainer = GRPOTrainer(model=..., reward_funcs=..., args=args, train_dataset=...)

``kl_mode``, ``kl_truncation`` and ``kl_rtg_baseline`` are ordinary dataclass fields, so TRL's ``TrlParser`` /
``HfArgumentParser`` read them from the command line (``--kl_mode k1-rtg-loss``) and from YAML configs. The mode
is resolved once, in ``__post_init__``, by :func:`kl_patches.modes.resolve_mode`: an explicit ``kl_mode`` beats
``KL_PATCHES_MODE``, which beats the default ``k1-rtg-loss``; ``kl-patches check --config`` resolves the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import trl

from kl_patches.integrations.trl import compat, kl
from kl_patches.modes import DESCRIPTIONS, K1_RTG_LOSS, MODES, resolve_mode, validate_mode
from kl_patches.terms import check_truncation

# The subclasses are only defined on a TRL they were verified against: importing this module elsewhere fails.
TRL_VERSION = compat.require()

DEFAULT_MODE = K1_RTG_LOSS
MODE_FIELD = "GRPOConfig.kl_mode"
RTG_BASELINES = ("none", "sequence-loo", "position-loo")


@dataclass
class GRPOConfig(trl.GRPOConfig):
    kl_mode: Optional[str] = field(
        default=None,
        metadata={
            "help": "How the KL to the reference model (beta > 0) enters the gradient: "
            + "; ".join(f"'{mode}': {DESCRIPTIONS[mode]}" for mode in MODES)
            + f". Unset: KL_PATCHES_MODE, else '{DEFAULT_MODE}' (exact on- and off-policy). k1-in-reward is exact "
            "on-policy only and refused off-policy (num_iterations > 1, steps_per_generation > "
            "gradient_accumulation_steps, vLLM).",
            "choices": list(MODES),
        },
    )
    kl_truncation: Optional[float] = field(
        default=None,
        metadata={"help": "k1-rtg-loss: truncate the per-decision importance weights at this value (>= 1): bounded "
                          "variance for a bias reported in kl_patches/truncated_fraction. Unset: untruncated (exact)."},
    )
    kl_rtg_baseline: str = field(
        default="none",
        metadata={"help": "k1-rtg-loss baseline: 'none' (measured lowest variance; no extra forward), or "
                          "'sequence-loo' / 'position-loo' computed over the whole generation batch (an extra no-grad "
                          "forward on-policy).", "choices": list(RTG_BASELINES)},
    )

    def __post_init__(self):
        # Before TRL's own checks: a typo in a kl-patches field is reported first, whatever else is wrong.
        self.kl_mode, self.kl_mode_origin = resolve_mode(self.kl_mode, MODE_FIELD, default=DEFAULT_MODE)
        if check_truncation(self.kl_truncation) is not None and self.kl_truncation < 1.0:
            # below 1 even on-policy weights (= 1) would be cut: a bias with nothing to gain
            raise ValueError(f"kl_truncation must be >= 1 (or unset for exact weights), got {self.kl_truncation}")
        if self.kl_rtg_baseline not in RTG_BASELINES:
            raise ValueError(f"unknown kl_rtg_baseline {self.kl_rtg_baseline!r}; choose one of "
                             f"{', '.join(RTG_BASELINES)}")
        super().__post_init__()


class GRPOTrainer(trl.GRPOTrainer):
    """TRL's GRPOTrainer whose KL term follows ``args.kl_mode`` (resolved like GRPOConfig's when ``args`` is a plain
    TRL ``GRPOConfig`` or None: ``KL_PATCHES_MODE``, else ``k1-rtg-loss``)."""

    _tag_names = [*getattr(trl.GRPOTrainer, "_tag_names", []), "kl-patches"]
    _kl_patches_owns_mode = True  # the in-place patch (kl_patches.enable) stands aside for this class

    @property
    def kl_mode(self) -> str:
        mode = getattr(self.args, "kl_mode", None)
        if mode is None:
            mode, _ = resolve_mode(None, MODE_FIELD, default=DEFAULT_MODE)
        return validate_mode(mode)

    def _generate_and_score_completions(self, inputs):
        return kl.score(self, lambda trainer, batch: super(GRPOTrainer, trainer)._generate_and_score_completions(batch),
                        inputs, self.kl_mode)

    def _compute_loss(self, model, inputs):
        return kl.loss(self, lambda trainer, m, batch: super(GRPOTrainer, trainer)._compute_loss(m, batch),
                       model, inputs, self.kl_mode)

    def compute_loss(self, model, inputs, *args, **kwargs):
        return kl.compute_loss(
            self, lambda trainer, m, batch, *a, **k: super(GRPOTrainer, trainer).compute_loss(m, batch, *a, **k),
            self.kl_mode, model, inputs, *args, **kwargs,
        )
