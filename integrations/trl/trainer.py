"""Drop-in subclasses of TRL's ``GRPOConfig`` and ``GRPOTrainer`` with a ``kl_mode`` field.

    from kl_patches.integrations.trl import GRPOConfig, GRPOTrainer
    args = GRPOConfig(..., beta=0.04, kl_mode="k1-in-reward")
    trainer = GRPOTrainer(model=..., reward_funcs=..., args=args, train_dataset=...)

``kl_mode`` is an ordinary dataclass field, so TRL's ``TrlParser`` / ``HfArgumentParser`` read it from the
command line (``--kl_mode k1-rtg-loss``) and from YAML configs (``kl_mode: k1-rtg-loss``) like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trl

from kl_patches.modes import DESCRIPTIONS, K1_IN_REWARD, MODES, validate_mode
from kl_patches.patching import require_version

from kl_patches.integrations.trl import kl

# The subclasses are only defined on a TRL they were verified against: importing this module elsewhere fails.
TRL_VERSION = require_version("trl", kl.SUPPORTED)


@dataclass
class GRPOConfig(trl.GRPOConfig):
    kl_mode: str = field(
        default=K1_IN_REWARD,
        metadata={
            "help": "How the KL to the reference model (beta > 0) enters the gradient: "
            + "; ".join(f"'{mode}': {DESCRIPTIONS[mode]}" for mode in MODES)
            + ". k1-in-reward is exact on-policy only; use k1-rtg-loss for off-policy batches "
            "(num_iterations > 1, steps_per_generation > gradient_accumulation_steps, vLLM).",
            "choices": list(MODES),
        },
    )

    def __post_init__(self):
        # Before TRL's own checks: a typo in kl_mode is reported first, whatever else is wrong.
        validate_mode(self.kl_mode)
        super().__post_init__()


class GRPOTrainer(trl.GRPOTrainer):
    """TRL's GRPOTrainer whose KL term follows ``args.kl_mode`` (default ``k1-in-reward`` when ``args`` is a
    plain TRL ``GRPOConfig`` or None)."""

    _tag_names = [*getattr(trl.GRPOTrainer, "_tag_names", []), "kl-patches"]
    _kl_patches_owns_mode = True  # the in-place patch (kl_patches.enable) stands aside for this class

    @property
    def kl_mode(self) -> str:
        return validate_mode(getattr(self.args, "kl_mode", K1_IN_REWARD))

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
