"""``kl-patches check --library unsloth``: Unsloth's own GRPO loss (``unsloth_zoo.rl_replacements.grpo_compute_loss``,
the function Unsloth inlines into its generated ``UnslothGRPOTrainer``) on every enumerated group of the core's tiny
policy, against the exact gradient of KL(pi || pi_ref) over whole responses.

What is audited is Unsloth's function itself, on its installed version, called with the arguments its generated
trainer passes (``ref``, ``new``, ``old`` = the log-probs the sampler's snapshot gave or None on-policy, the
completion mask, ``beta``, the advantages, ``loss_type``, ``num_items_in_batch``, ``max_completion_length``,
``use_bias_correction_kl``, ``importance_sampling_level``). The task reward is 0 (advantages 0), so the gradient
audited is the KL part. Not audited: the generated trainer around it (``grpo_accumulated_loss``, its chunking and
batching), which Unsloth builds only on a GPU; on a CPU Unsloth's CPU backend trains with TRL's stock trainers.
"""

from __future__ import annotations

import contextlib
import io
from typing import Sequence

import torch

from kl_patches.audit import AuditRecord, PolicySpec
from kl_patches.audit.engine import build_problem, exact_kl_gradient, per_group
from kl_patches.audit.records import NOT_COVERED, audit_record
from kl_patches.modes import ENV_VAR, K1_RTG_LOSS, LIBRARY
from kl_patches.integrations.unsloth import AUDITED
from kl_patches.patching import PatchError, installed_version

LIBRARY_NAME = "unsloth"
GROUP_SIZE = 2
BETA = 0.001  # Unsloth's default beta for loss_type grpo / bnpo (0 for dapo / dr_grpo: no KL at all)
FIX = (f"train with TRL's GRPOTrainer and kl_mode: {K1_RTG_LOSS} in an environment without Unsloth (kl-patches "
       f"refuses its modes while Unsloth is importable: its generated trainer would keep this k3)")
NOTES = ("Unsloth's grpo_compute_loss called directly on each enumerated group (float64 log-probs of the core's "
         "tiny policy), with the arguments its generated UnslothGRPOTrainer passes; the trainer around it is built "
         "only on a GPU and is not audited here",
         "task reward 0 (advantages 0): the gradient audited is the KL part alone")

#: (configuration, settings): Unsloth's defaults and the TRL options it forwards to its loss.
CELLS = (
    (f"Unsloth GRPO loss_type=grpo, beta={BETA} (Unsloth's default beta for grpo/bnpo)", {"loss_type": "grpo"}),
    (f"loss_type=bnpo, beta={BETA}", {"loss_type": "bnpo"}),
    (f"loss_type=dapo, beta={BETA} (Unsloth's default dapo has beta=0: no KL)", {"loss_type": "dapo"}),
    (f"loss_type=dr_grpo, beta={BETA}", {"loss_type": "dr_grpo"}),
    ("loss_type=dapo, use_bias_correction_kl=True (TRL 1.x's default, forwarded)",
     {"loss_type": "dapo", "use_bias_correction_kl": True}),
    ("loss_type=dapo, importance_sampling_level=sequence, use_bias_correction_kl=True",
     {"loss_type": "dapo", "use_bias_correction_kl": True, "importance_sampling_level": "sequence"}),
)


def load_loss():
    """Unsloth's loss function, imported the way Unsloth requires (``unsloth`` before ``unsloth_zoo``); Unsloth's
    import-time banner goes to stderr. PatchError when Unsloth is missing or its function moved."""
    if installed_version("unsloth") is None or installed_version("unsloth_zoo") is None:
        raise PatchError("unsloth and unsloth_zoo are not installed; kl-patches check --library unsloth audits their "
                         "grpo_compute_loss (pip install unsloth)")
    with contextlib.redirect_stdout(io.StringIO()):
        import unsloth  # noqa: F401  (unsloth_zoo refuses to import before it)
        from unsloth_zoo import rl_replacements
    loss = getattr(rl_replacements, "grpo_compute_loss", None)
    if loss is None:
        raise PatchError(f"unsloth_zoo {installed_version('unsloth_zoo')}: rl_replacements.grpo_compute_loss not "
                         f"found; kl-patches knows it from unsloth_zoo {AUDITED}")
    return loss


def scalar_loss(grpo_compute_loss, settings: dict, num_items: float, horizon: int):
    def loss(batch) -> torch.Tensor:
        old = None if batch.on_policy else batch.behaviour_logp
        result = grpo_compute_loss(
            batch.ref_logp, batch.logp, old, None, batch.tokens, batch.mask.to(batch.logp.dtype), BETA,
            torch.zeros(batch.tokens.shape[0], dtype=batch.logp.dtype),
            loss_type=settings.get("loss_type", "grpo"), max_completion_length=horizon,
            num_items_in_batch=torch.tensor(num_items, dtype=torch.float64), current_gradient_accumulation_steps=1,
            use_bias_correction_kl=settings.get("use_bias_correction_kl", False),
            importance_sampling_level=settings.get("importance_sampling_level", "token"),
        )
        return result[0]

    return loss


def nominal_scale(loss_type: str, num_items: float, horizon: int) -> float:
    """The constant each aggregation multiplies grad KL_seq by if it were exact (as TRL's audit declares it)."""
    if loss_type == "dr_grpo":
        return BETA / horizon
    return BETA * GROUP_SIZE / num_items  # token means at the (fixed) expected token count


def audit(spec: PolicySpec | None = None, *, config: str | None = None, args: Sequence[str] = ()) -> list[AuditRecord]:
    if config is not None or args:
        raise ValueError("kl-patches check --library unsloth audits Unsloth's loss function; it takes no --config "
                         "(audit your TRL configuration with --library trl)")
    spec = spec or PolicySpec()
    grpo_compute_loss = load_loss()
    version = installed_version("unsloth_zoo")
    records = []
    for off_policy in (False, True):
        problem = build_problem(spec, off_policy=off_policy)
        truth = exact_kl_gradient(problem)
        num_items = GROUP_SIZE * float(problem.mask.sum(-1).double().mean())
        for configuration, settings in CELLS:
            loss_type = settings["loss_type"]
            bias = settings.get("use_bias_correction_kl", False)
            estimator = "k3 x " + ("sequence" if settings.get("importance_sampling_level") == "sequence"
                                   else "token") + " ratio" if bias else "k3"
            reason = (f"Unsloth's grpo_compute_loss: {estimator} in the loss (clamped at 10), aggregated by "
                      f"loss_type={loss_type}: the per-position gradient, missing the future-token KL"
                      + ("" if not off_policy else "; nothing reweights the prefix distribution off-policy"))
            records.append(audit_record(
                problem, per_group(scalar_loss(grpo_compute_loss, settings, num_items, spec.horizon)),
                library=LIBRARY_NAME, library_version=version, configuration=configuration, estimator=estimator,
                placement="loss", reason=reason, mode=LIBRARY, group_size=GROUP_SIZE,
                scale=nominal_scale(loss_type, num_items, spec.horizon), fix=FIX, notes=list(NOTES), truth=truth,
                settings=settings, beta=BETA,
            ))
    records.append(AuditRecord(
        library=LIBRARY_NAME, library_version=version,
        configuration=f"kl_mode={K1_RTG_LOSS} / k1-in-reward with Unsloth ({ENV_VAR} or kl_mode)", mode=K1_RTG_LOSS,
        estimator="-", placement="-", policy="on", rel_err=None, cosine=None, norm_ratio=None, verdict=NOT_COVERED,
        reason="Unsloth's generated UnslothGRPOTrainer inlines grpo_compute_loss, which kl-patches' TRL patch does not "
               "reach; kl-patches refuses its modes (PatchError naming Unsloth) while Unsloth is importable",
        fix=FIX, spec={}, notes=[],
    ))
    return records
