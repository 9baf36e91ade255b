"""``kl_patches.enable("trl", mode)``: patch ``trl.GRPOTrainer`` in place, for code that builds TRL's own class
(the ``trl grpo`` command line, scripts, ``accelerate launch`` ranks).

Three patch targets on ``trl.trainer.grpo_trainer.GRPOTrainer`` (the class ``trl.GRPOTrainer`` names), one
:class:`~kl_patches.patching.Patch` each, every replacement delegating to :mod:`.kl` with TRL's original method.
Subclasses inherit the patch; kl-patches' own subclass (which carries its mode in its config) is left alone.
"""

from __future__ import annotations

from kl_patches.patching import Integration, Patch

from kl_patches.integrations.trl import kl


class TRLIntegration(Integration):
    library = "trl"
    distribution = "trl"
    supported = kl.SUPPORTED

    def build_patches(self, mode: str) -> list:
        from trl.trainer import grpo_trainer

        owner = grpo_trainer.GRPOTrainer
        return [
            Patch(owner, "_generate_and_score_completions", self._score_replacement, self.library),
            Patch(owner, "_compute_loss", self._loss_replacement, self.library),
            Patch(owner, "compute_loss", self._compute_loss_replacement, self.library),
        ]

    # Each replacement reads ``self.mode`` when called, so one set serves every mode; an instance of kl-patches'
    # own GRPOTrainer subclass applies its config's mode itself and passes straight through here.

    def _score_replacement(self, original):
        integration = self

        def _generate_and_score_completions(trainer, inputs):
            if getattr(trainer, kl.OWNER_FLAG, False) or integration.mode is None:
                return original(trainer, inputs)
            return kl.score(trainer, original, inputs, integration.mode)

        return _generate_and_score_completions

    def _loss_replacement(self, original):
        integration = self

        def _compute_loss(trainer, model, inputs):
            if getattr(trainer, kl.OWNER_FLAG, False) or integration.mode is None:
                return original(trainer, model, inputs)
            return kl.loss(trainer, original, model, inputs, integration.mode)

        return _compute_loss

    def _compute_loss_replacement(self, original):
        integration = self

        def compute_loss(trainer, model, inputs, *args, **kwargs):
            if getattr(trainer, kl.OWNER_FLAG, False) or integration.mode is None:
                return original(trainer, model, inputs, *args, **kwargs)
            return kl.compute_loss(trainer, original, integration.mode, model, inputs, *args, **kwargs)

        return compute_loss


INTEGRATION = TRLIntegration()
