"""OpenRLHF's KL math under kl-patches: the k1-rtg-loss tokens, the fixed normaliser and the per-step metrics.

Everything here is plain torch on OpenRLHF's tensors and its parsed arguments; :mod:`.patches` decides when it
runs. The loss needs nothing from other rows (baseline "none", the measured default: ``kl_patches.statistics``),
so OpenRLHF's replay-buffer shuffle, dynamic batching and rank split cannot change its expectation, provided

* mu is the sampler (``Experience.rollout_log_probs``, vLLM's processed log-probs, recorded when
  ``--algo.advantage.is_correction_level`` is not ``off``), and
* the normaliser C is a constant fixed before sampling: ``--train.batch_size`` (sequences per optimizer step) x
  ``--rollout.max_new_tokens`` (or ``--data.max_len`` when that is unset), so beta keeps its token-mean meaning.
"""

from __future__ import annotations

import os

import torch

from kl_patches import estimators, terms
from kl_patches.statistics import importance_weight_stats

Tensor = torch.Tensor

#: Where the worker processes read ``--algo.kl.truncation`` (set by the launcher in the Ray runtime env).
TRUNCATION_ENV = "KL_PATCHES_OPENRLHF_TRUNCATION"

#: ``kl_patches/mu_source`` values in OpenRLHF's logged status (metrics are numbers).
MU_SAMPLER = 1.0  # Experience.rollout_log_probs: vLLM's log-probs of the tokens it sampled
MU_TRAINER = 0.0  # Experience.action_log_probs: the actor's recomputation at experience time (a stand-in)
MU_SOURCES = {MU_SAMPLER: "rollout_log_probs (the sampler, vLLM)",
              MU_TRAINER: "action_log_probs (the actor's recomputation; not the sampler)"}


def response_length(args) -> int:
    """The fixed length of C: ``--rollout.max_new_tokens``, else ``--data.max_len`` (an upper bound OpenRLHF
    truncates every response to)."""
    length = getattr(args.rollout, "max_new_tokens", None)
    return int(length if length else args.data.max_len)


def fixed_normalizer(args) -> float:
    """C = sequences per optimizer step (``--train.batch_size``, global) x :func:`response_length`."""
    return float(args.train.batch_size) * response_length(args)


def truncation_from_env(environ=None) -> float | None:
    value = (os.environ if environ is None else environ).get(TRUNCATION_ENV, "").strip()
    if not value:
        return None
    try:
        return terms.check_truncation(float(value))
    except ValueError as error:
        raise ValueError(f"{TRUNCATION_ENV}={value!r}: {error}") from None


def rtg_loss_tokens(
    log_probs: Tensor,
    ref_log_probs: Tensor,
    action_mask: Tensor,
    *,
    behaviour_log_probs: Tensor | None,
    value: Tensor,
    baseline: str | Tensor = "none",
    truncation: float | None = None,
    scale: float | Tensor = 1.0,
) -> Tensor:
    """Per-token ``k1-rtg-loss`` for OpenRLHF's ``aggregate_loss``: forward ``value`` (the logged KL estimate),
    gradient ``scale * log pi_t * sg(sum_{t'>=t} rho_{1:t'} l_t' - rho_{1:t} b)`` (kl_patches.terms). ``baseline``
    is "none" or a per-row tensor fixed over whole groups before the split. Masked positions are exactly 0 with
    zero gradient."""
    mask = action_mask.bool() if action_mask.dtype != torch.bool else action_mask
    coefficients = terms.rtg_coefficients(log_probs, ref_log_probs, mask, behaviour_logp=behaviour_log_probs,
                                          baseline=baseline, truncation=truncation)
    dtype = estimators.compute_dtype(log_probs, ref_log_probs)
    surrogate = estimators.masked(log_probs.to(dtype), mask) * (coefficients * scale)
    shown = estimators.masked(value.detach().to(dtype), mask)
    return shown + surrogate - surrogate.detach()


def kl_scale(batch_num_tokens, dp_size: int, deepspeed_gas: int, normalizer: float, dtype=torch.float64):
    """The factor that turns OpenRLHF's KL aggregation into beta/C x sum over the step's responses.

    ``aggregate_loss`` returns ``sum(kl) / batch_num_tokens * dp_size``; DeepSpeed scales each backward by
    ``1 / gas`` and averages gradients over the ``dp_size`` ranks. Multiplying the per-token surrogate by
    ``batch_num_tokens * gas / C`` leaves ``sum(surrogate) / C`` summed over every micro-batch of every rank."""
    tokens = torch.as_tensor(batch_num_tokens, dtype=dtype).detach().cpu()
    if not float(tokens) > 0:
        raise ValueError(f"batch_num_tokens must be positive, got {float(tokens)}")
    return tokens * float(deepspeed_gas) / float(normalizer)


def kl_scale_micro_batch(action_mask: Tensor, dp_size: int, deepspeed_gas: int, loss_scale: float,
                         normalizer: float, dtype=torch.float64):
    """The same factor for OpenRLHF 0.9's KL block: ``masked_mean(kl, action_mask)`` divides by this micro-batch's
    token count n, ``training_step`` multiplies by ``loss_scale`` (``dynamic_loss_scale[step]``, 1 without dynamic
    batching), DeepSpeed by 1/gas and averages over ``dp_size`` ranks; ``n * gas * dp_size / (loss_scale * C)``
    leaves ``sum(surrogate) / C`` summed over every micro-batch of every rank."""
    tokens = action_mask.detach().to("cpu", dtype).sum()
    if not float(tokens) > 0:
        raise ValueError("the micro-batch has no response token")
    if not loss_scale > 0:
        raise ValueError(f"the micro-batch loss scale must be positive, got {loss_scale}")
    return tokens * (float(deepspeed_gas) * float(dp_size) / (float(loss_scale) * float(normalizer)))


def step_metrics(log_probs: Tensor, ref_log_probs: Tensor, behaviour_log_probs: Tensor, action_mask: Tensor,
                 *, truncation: float | None, mu_source: float) -> dict[str, Tensor]:
    """``kl_patches/*`` entries for ``experience.info`` (0-dim: token-weighted, (B,): sample-weighted by
    ``ppo_train``): sequence KL at the current policy, the importance weights' ESS, truncated and capped fractions,
    and which log-probs were mu."""
    mask = action_mask.bool()
    with torch.no_grad():
        logp = log_probs.detach()
        stats = importance_weight_stats(logp, behaviour_log_probs.detach().to(logp.dtype), mask, truncation)
        device = log_probs.device
        metrics = {"kl_patches/sequence_kl": terms.sequence_kl(logp, ref_log_probs.detach().to(logp.dtype),
                                                               mask).float()}
        for name in ("ess", "truncated_fraction", "capped_fraction"):
            metrics[f"kl_patches/{name}"] = torch.tensor(stats[name], dtype=torch.float32, device=device)
        metrics["kl_patches/mu_source"] = torch.tensor(mu_source, dtype=torch.float32, device=device)
    return metrics
