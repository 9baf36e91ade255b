"""``kl-patches check --library openrlhf -- <train_ppo_ray args>``: the user's configuration through OpenRLHF's step.

The command line goes through the launcher's own planning (OpenRLHF's parser and checks, the mode's precedence, the
refusals). A configuration kl-patches refuses at launch, or one the harness cannot model, is reported
"not covered" with the reason and the fix (the CLI exits 1). Otherwise the user's flags are kept -- mode, KL
estimator and placement, advantage estimator, policy-loss options, is_correction, packing, dynamic batching, async
-- and only the sizes are shrunk to an enumerable generation batch that keeps their structure (several optimizer
steps per rollout, several epochs, gradient accumulation, 2 ranks), then the step cell runs through ``ppo_train``:

* ``on``: the sampler is the policy (the first optimizer step of a sync rollout);
* ``off``: a stale sampler (later mini-batches / epochs, async), the actor's ``action_log_probs`` = the sampler's
  (sync) or the current weights' (``--train.async_enable``);
* ``mismatch``: vLLM samples from a slightly different distribution than the actor recomputes (every vLLM run):
  ``action_log_probs`` = the current policy's, vLLM's ``rollout_log_probs`` kept only with is_correction on.
"""

from __future__ import annotations

import contextlib
import io
from typing import Sequence

from kl_patches.audit import AuditRecord, PolicySpec
from kl_patches.audit.records import NOT_COVERED
from kl_patches.integrations.openrlhf import compat
from kl_patches.integrations.openrlhf.audit.cells import GROUP_SIZE, STEP_GROUPS, STEP_HORIZON, StepCell
from kl_patches.integrations.openrlhf.audit.harness import BASE_ARGV, LIBRARY_NAME, StepSetup
from kl_patches.modes import K1_IN_REWARD, K1_RTG_LOSS, KLModeError
from kl_patches.patching import installed_version

FIX_RTG = "--algo.kl.mode k1-rtg-loss --algo.advantage.is_correction_level token"


def _with_model_paths(argv: list[str]) -> list[str]:
    """The audit loads no model: fill in the model paths OpenRLHF's checks read when the command line has none."""
    given = {item.split("=", 1)[0] for item in argv}
    extra: list[str] = []
    remote, reward = compat.flag("reward.remote_url"), compat.flag("reward.model_name_or_path")
    for flag, value in zip(BASE_ARGV[::2], BASE_ARGV[1::2]):
        flag = compat.flag(flag[2:])
        if flag not in given and not (flag == reward and remote in given):
            extra += [flag, value]
    return extra + argv


def _not_covered(label: str, mode: str, estimator: str, reason: str, fix: str | None, notes: list[str],
                 argv: Sequence[str]) -> AuditRecord:
    return AuditRecord(
        library=LIBRARY_NAME, library_version=installed_version(LIBRARY_NAME) or "?", configuration=label, mode=mode,
        estimator=estimator, placement="-", policy="-", rel_err=None, cosine=None, norm_ratio=None,
        verdict=NOT_COVERED, reason=compat.to_flags(reason), fix=None if fix is None else compat.to_flags(fix),
        notes=list(notes), user_config=True, spec={"argv": list(argv)})


def unmodelled(args) -> list[str]:
    """What of this configuration the step harness does not reproduce (reported "not covered")."""
    out = []
    if args.ds.ring_attn_size > 1:
        out.append(f"--ds.ring_attn_size {args.ds.ring_attn_size}: ring attention splits sequences across ranks")
    if args.ds.tensor_parallel_size > 1:
        out.append(f"--ds.tensor_parallel_size {args.ds.tensor_parallel_size}: DeepSpeed tensor parallelism")
    if args.reward.remote_url is None and getattr(args.train, "agent_func_path", None):
        out.append("--train.agent_func_path: multi-turn agent rollouts (tool tokens inside the action mask)")
    return [compat.to_flags(item) for item in out]


def step_sizes(args, plan_ranks: int) -> list[str]:
    """Sizes of an enumerable generation batch (2 prompts x 2 responses, at most 2 tokens) with the structure of the
    user's: several optimizer steps per rollout if the user has them, up to 2 epochs, accumulation, up to 2 ranks."""
    rows = STEP_GROUPS * GROUP_SIZE
    ranks = plan_ranks
    several_steps = args.rollout.batch_size * args.rollout.n_samples_per_prompt > args.train.batch_size
    train_batch = rows // 2 if several_steps else rows
    accumulates = args.train.batch_size // max(args.train.micro_batch_size * ranks, 1) > 1
    micro = 1 if accumulates or train_batch // ranks < 1 else train_batch // ranks
    sizes = ["--rollout.n_samples_per_prompt", str(GROUP_SIZE), "--rollout.batch_size", str(STEP_GROUPS),
             "--rollout.micro_batch_size", "1", "--rollout.vllm_generate_batch_size", str(STEP_GROUPS),
             "--rollout.max_new_tokens", str(STEP_HORIZON), "--train.batch_size", str(train_batch),
             "--train.micro_batch_size", str(micro), "--train.max_epochs",
             str(min(args.train.max_epochs, 2)), "--actor.num_nodes", "1", "--actor.num_gpus_per_node", str(ranks)]
    if args.train.dynamic_batch_enable:
        sizes += ["--train.max_tokens_per_gpu", "4"]
    return compat.translate_argv(sizes)


def audit_user(spec: PolicySpec, argv: list[str], notes: list[str]) -> list[AuditRecord]:
    from kl_patches.integrations.openrlhf import audit as runner
    from kl_patches.integrations.openrlhf import config as cli

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            plan = cli.plan(_with_model_paths(argv), strict=False)
    except SystemExit as error:  # argparse rejected the command line
        raise KLModeError(f"train_ppo_ray rejected the arguments (exit {error.code}): "
                          f"run them through kl-patches-openrlhf --help") from None
    except (AssertionError, AttributeError, ValueError) as error:
        if isinstance(error, KLModeError):
            raise
        raise KLModeError(f"OpenRLHF rejected the arguments: {error!r}") from None
    args = plan.args
    label = " ".join(argv)
    notes = [*notes, *plan.notes]
    kl = args.algo.kl
    if not kl.init_coef > 0:
        return [_not_covered(label, plan.mode, kl.estimator, "--algo.kl.init_coef 0: no KL regularisation to audit.",
                             None, notes, argv)]
    estimator = "k1" if plan.mode in (K1_IN_REWARD, K1_RTG_LOSS) else kl.estimator
    if plan.refused:
        return [_not_covered(label, plan.mode, estimator, f"{refusal.flag}: {refusal.reason}.", refusal.fix, notes,
                             argv) for refusal in plan.refused]
    missing = unmodelled(args)
    if missing:
        return [_not_covered(label, plan.mode, estimator, f"not modelled by the step audit: {item}.", None, notes,
                             argv) for item in missing]
    if args.rollout.top_p < 1.0:  # library mode (the kl-patches modes refuse it above)
        return [_not_covered(label, plan.mode, estimator,
                             f"--rollout.top_p {args.rollout.top_p:g}: the sampler's support is truncated; no audit "
                             "of a truncated sampler is exact.", "--rollout.top_p 1.0", notes, argv)]
    ranks = min(2, args.actor.num_nodes * args.actor.num_gpus_per_node)
    step_argv = (*[a for a in plan.argv], *step_sizes(args, ranks))
    placement = "loss" if (plan.mode == K1_RTG_LOSS or kl.use_loss) else "reward"
    async_run = bool(getattr(args.train, "async_enable", False))
    several_steps = bool(cli.off_policy_reasons(args))
    regimes: list[tuple[str, StepSetup]] = [("on", StepSetup(ranks=ranks))]
    if several_steps:
        regimes.append(("off", StepSetup(ranks=ranks, actor_log_probs="current" if async_run else "sampler")))
    if (args.vllm.num_engines or 0) > 0 and not async_run:
        regimes.append(("mismatch", StepSetup(ranks=ranks, actor_log_probs="current")))
    elif async_run and not several_steps:
        regimes.append(("off", StepSetup(ranks=ranks, actor_log_probs="current")))
    records = []
    for regime, setup in regimes:
        cell = StepCell(label, tuple(step_argv), plan.mode, estimator, placement, "", "", setup,
                        fix=compat.to_flags(FIX_RTG))
        reason = compat.to_flags(_reason(plan, regime, placement))
        record = runner.audit_step_cell(spec, cell, "on" if regime == "on" else "off", notes=notes,
                                        user_config=True, reason=reason, argv=argv)
        record.spec["regime"] = regime
        records.append(record)
    return records


def _reason(plan, regime: str, placement: str) -> str:
    args = plan.args
    if plan.mode == K1_RTG_LOSS:
        if regime == "mismatch" and plan.mu_source != "rollout_log_probs":
            return ("vLLM's sampler differs from the actor's recomputation and --algo.advantage.is_correction_level "
                    "is off: mu is action_log_probs, not the sampler.")
        return ("k1 reward-to-go surrogate, mu = " + (plan.mu_source or "?") + ", KL normaliser fixed before "
                "sampling, through OpenRLHF's ppo_train with this configuration's packing, batching, accumulation and "
                "ranks.")
    what = {"on": "on-policy", "off": "off-policy (stale sampler)", "mismatch": "vLLM/actor mismatch"}[regime]
    if placement == "reward":
        return (f"{what}: KL in the reward through the policy loss, divided by the step's realised token count (a "
                f"ratio estimator); off-policy, the per-token PPO ratio does not correct the prefix distribution.")
    return (f"{what}: --algo.kl.use_loss with --algo.kl.estimator {args.algo.kl.estimator}: a per-token KL loss "
            f"(own-token gradient at most), divided by the realised token count.")
