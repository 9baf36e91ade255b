"""``train_ppo_ray`` command lines: OpenRLHF's own parser and checks, plus ``--algo.kl.mode`` and its validation.

OpenRLHF builds its parser and post-processes the arguments inside ``if __name__ == "__main__":`` of
``openrlhf.cli.train_ppo_ray``, so both are reached by running that block (``runpy``) and stopping it at the right
moment: at ``parse_args`` to get the parser, and at ``get_strategy(args)`` (the first thing ``train`` does after
checking Ray) to get the arguments exactly as ``train`` would receive them, after every OpenRLHF check. Nothing
is trained, Ray is not started.
"""

from __future__ import annotations

import argparse
import contextlib
import runpy
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from kl_patches.integrations.openrlhf import compat
from kl_patches.modes import ENV_VAR, K1_IN_REWARD, K1_RTG_LOSS, LIBRARY, MODES, KLModeError, resolve_mode
from kl_patches.patching import PatchError, installed_version

CLI_MODULE = "openrlhf.cli.train_ppo_ray"
#: kl-patches' own flags and the correction flag as 0.11 spells them; :func:`mode_flag` / :func:`own_flags` and
#: ``compat.to_flags`` give the installed release's spelling (0.9: ``--kl_mode``, ``--kl_truncation``).
MODE_FLAG = "--algo.kl.mode"
TRUNCATION_FLAG = "--algo.kl.truncation"
OWN_FLAGS = (MODE_FLAG, TRUNCATION_FLAG)
CORRECTION_FLAG = "--algo.advantage.is_correction_level"


def mode_flag() -> str:
    return compat.flag(MODE_FLAG[2:])


def own_flags() -> tuple[str, str]:
    return compat.flag(MODE_FLAG[2:]), compat.flag(TRUNCATION_FLAG[2:])

#: Advantage estimators after which the reward-to-go of a per-token k1 reward reaches the policy loss untouched
#: (a baseline of the task reward only, no whitening of the advantages that carry the KL).
EXACT_REWARD_ESTIMATORS = ("rloo", "group_norm", "dr_grpo", "flash_reinforce")


class _Stop(Exception):
    def __init__(self, value) -> None:
        super().__init__("captured")
        self.value = value


@contextlib.contextmanager
def _swapped(owner, attribute: str, value) -> Iterator[None]:
    original = getattr(owner, attribute)
    setattr(owner, attribute, value)
    try:
        yield
    finally:
        setattr(owner, attribute, original)


def _run_cli_main() -> None:
    runpy.run_module(CLI_MODULE, run_name="__main__", alter_sys=False)


def openrlhf_parser() -> argparse.ArgumentParser:
    """A fresh copy of ``train_ppo_ray``'s parser, as its ``__main__`` block builds it."""

    def stop(parser, *_args, **_kwargs):
        raise _Stop(parser)

    try:
        with _swapped(argparse.ArgumentParser, "parse_args", stop):
            _run_cli_main()
    except _Stop as captured:
        return captured.value
    raise PatchError(f"openrlhf {installed_version('openrlhf')}: {CLI_MODULE} no longer parses its arguments in its "
                     f"__main__ block; kl-patches cannot read train_ppo_ray command lines")


def launcher_parser() -> argparse.ArgumentParser:
    """OpenRLHF's parser plus ``--algo.kl.mode`` and ``--algo.kl.truncation``: every train_ppo_ray argument is
    accepted, unknown ones rejected."""
    parser = openrlhf_parser()
    parser.prog = "kl-patches-openrlhf"
    parser.description = ("OpenRLHF's train_ppo_ray with the exact sequence-level KL gradient of kl-patches in "
                          "every Ray process. All train_ppo_ray arguments, plus --algo.kl.mode and "
                          "--algo.kl.truncation.")
    mode, truncation = own_flags()
    parser.add_argument(
        mode, dest=MODE_FLAG[2:], choices=MODES, default=None,
        help=f"library (default, or {ENV_VAR}): OpenRLHF's own KL, unchanged; k1-in-reward: force the k1 estimator "
             "in the reward (exact on-policy); k1-rtg-loss: the k1 reward-to-go loss with per-decision importance "
             "weights from vLLM's log-probs (exact on- and off-policy; turns on --algo.kl.use_loss). An explicit "
             f"value beats {ENV_VAR}",
    )
    parser.add_argument(
        truncation, dest=TRUNCATION_FLAG[2:], type=float, default=None,
        help="k1-rtg-loss: truncate the per-decision importance weights at this value (> 1; lower variance, a "
             "bias; default: none, exact)",
    )
    return parser


def strip_mode(argv: Sequence[str]) -> list[str]:
    """``argv`` without kl-patches' own flags (``--algo.kl.mode X``, ``--algo.kl.truncation X``, or ``=X``):
    OpenRLHF does not know them."""
    own = own_flags()
    out, skip = [], False
    for index, item in enumerate(argv):
        if skip:
            skip = False
            continue
        if item in own:
            skip = index + 1 < len(argv)
            continue
        if item.split("=", 1)[0] in own and "=" in item:
            continue
        out.append(item)
    return out


def explicit_mode(argv: Sequence[str]) -> str | None:
    """The ``--algo.kl.mode`` value on the command line, None when absent (read before OpenRLHF is imported, so
    the post-import autoloader already sees the mode that wins)."""
    value, flag = None, mode_flag()
    for index, item in enumerate(argv):
        if item == flag and index + 1 < len(argv):
            value = argv[index + 1]
        elif item.startswith(flag + "="):
            value = item.split("=", 1)[1]
    return value


def openrlhf_args(argv: Sequence[str]):
    """The arguments ``train`` receives for ``train_ppo_ray <argv>``, after all of OpenRLHF's own checks (an
    AssertionError or SystemExit from them propagates), with 0.11's nested names (``compat.nested``: a view of a flat
    release's namespace; ``compat.flat`` gives OpenRLHF's own back). Needs neither Ray nor a GPU."""
    import ray

    import openrlhf.utils

    def stop(args):
        raise _Stop(args)

    import sys

    saved_argv = sys.argv
    sys.argv = ["train_ppo_ray", *argv]
    try:
        with _swapped(openrlhf.utils, "get_strategy", stop), _swapped(ray, "is_initialized", lambda: True):
            _run_cli_main()
    except _Stop as captured:
        return compat.nested(captured.value)
    finally:
        sys.argv = saved_argv
    raise PatchError(f"openrlhf {installed_version('openrlhf')}: train_ppo_ray's train() no longer starts with "
                     f"get_strategy(args); kl-patches cannot read its arguments")


def rollout_steps(args) -> float:
    """Optimizer steps taken on one rollout batch (> 1: every mini-batch after the first is off-policy)."""
    samples = args.rollout.batch_size * args.rollout.n_samples_per_prompt
    return samples / args.train.batch_size * args.train.max_epochs


def off_policy_reasons(args) -> list[str]:
    reasons = []
    steps = rollout_steps(args)
    if steps > 1:
        reasons.append(
            f"each rollout of {args.rollout.batch_size} x {args.rollout.n_samples_per_prompt} samples is trained in "
            f"{steps:g} optimizer steps (--train.batch_size {args.train.batch_size}, --train.max_epochs "
            f"{args.train.max_epochs}): every mini-batch after the first is off-policy")
    if getattr(args.train, "async_enable", False):
        reasons.append("--train.async_enable trains on samples from an older policy")
    return reasons


def reward_path_issues(args) -> list[str]:
    """Why a k1 reward does not reach the policy gradient as the exact reward-to-go (on-policy), if it does not."""
    issues = []
    estimator = args.algo.advantage.estimator
    if estimator in ("gae", "reinforce", "reinforce_baseline"):
        issues.append(
            f"--algo.advantage.estimator {estimator} whitens the advantages, KL included, with the batch's own token "
            f"mean{'' if args.algo.advantage.no_std_norm else ' and std'} (sample-dependent statistics: a bias that "
            f"shrinks with the batch, and beta rescaled by 1/std)")
    if estimator == "gae" and (args.algo.advantage.gamma != 1 or args.algo.advantage.lambd != 1):
        issues.append("GAE with gamma or lambd below 1 discounts the future-token KL")
    if estimator == "reinforce" and args.algo.advantage.gamma != 1:
        issues.append("reinforce with gamma below 1 discounts the future-token KL")
    if getattr(args.actor, "loss_agg_mode", "token-mean") != "token-mean" or args.actor.policy_loss_type == "gspo":
        issues.append("the policy loss is not a token mean (seq-mean-token-mean or gspo weights each response by "
                      "1/|y|): a length-weighted objective")
    return [compat.to_flags(issue) for issue in issues]


def records_sampler_log_probs(args) -> bool:
    """OpenRLHF asks vLLM for its (processed, after temperature) log-probs of the sampled tokens and keeps them as
    ``Experience.rollout_log_probs`` only when ``--algo.advantage.is_correction_level`` is not ``off``. No flag
    records them without also turning on OpenRLHF's TIS/mask correction of the policy loss, so kl-patches does not
    turn it on for the user: it refuses (async) or warns (sync). 0.11.0 - 0.11.1 call the flag
    --algo.advantage.is_correction_enable."""
    level = getattr(args.algo.advantage, "is_correction_level", None)
    if level is not None:
        return level != "off"
    return bool(getattr(args.algo.advantage, "is_correction_enable", False))


@dataclass
class Refusal:
    """A configuration kl-patches cannot make exact: why, and what to change."""

    flag: str
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"{self.flag}: {self.reason}; fix: {self.fix}"


def refusals(mode: str, args) -> list[Refusal]:
    """Why ``mode`` cannot be exact under ``args`` (empty when it can, or for ``library``)."""
    if mode == LIBRARY:
        return []
    out = []
    if getattr(args.algo, "dynamic_filtering_enable", False):
        out.append(Refusal(
            "--algo.dynamic_filtering_enable",
            "dynamic filtering drops the prompt groups whose rewards fall outside --algo.dynamic_filtering_range, so "
            "the KL is taken over a reward-filtered distribution, not over the policy's responses (measured: 0.28 "
            "relative error with 58 % of groups filtered)",
            "drop --algo.dynamic_filtering_enable, or run --algo.kl.mode library knowing the KL gradient is biased"))
    if args.rollout.top_p < 1.0:
        out.append(Refusal(
            f"--rollout.top_p {args.rollout.top_p:g}",
            "nucleus sampling gives zero probability to tokens pi_theta can emit; no importance weight reaches "
            "them, so the KL gradient misses that mass (measured: 0.63 relative error, corrected or not)",
            "--rollout.top_p 1.0 (temperature is fine: vLLM's log-probs are taken after it)"))
    if mode == K1_RTG_LOSS and getattr(args.train, "async_enable", False) and not records_sampler_log_probs(args):
        out.append(Refusal(
            "--train.async_enable",
            "async training samples with older weights than the actor that recomputes action_log_probs, and "
            "OpenRLHF keeps vLLM's log-probs only with --algo.advantage.is_correction_level on: without them stale "
            "samples get importance weight 1 (measured: 11 % / 36 % relative error)",
            f"add {CORRECTION_FLAG} token (vLLM then records its log-probs; k1-rtg-loss takes them as mu)"))
    if mode == K1_IN_REWARD and getattr(args.train, "async_enable", False):
        out.append(Refusal(
            "--train.async_enable",
            "k1-in-reward is exact on-policy only, and async training trains on samples from older weights",
            f"{MODE_FLAG} k1-rtg-loss with {CORRECTION_FLAG} token"))
    return [Refusal(compat.to_flags(r.flag), compat.to_flags(r.reason), compat.to_flags(r.fix)) for r in out]


@dataclass
class LaunchPlan:
    """What the launcher will run: the mode (and where it came from), OpenRLHF's argv, its parsed arguments, what
    was changed or noted, and what makes the mode inexact (``refused``; :func:`plan` raises on it when strict)."""

    mode: str
    argv: list[str]
    args: object
    notes: list[str] = field(default_factory=list)
    origin: str = "default"
    truncation: float | None = None
    refused: list[Refusal] = field(default_factory=list)
    normalizer: float | None = None
    mu_source: str | None = None


def plan(argv: Sequence[str], *, strict: bool = True, environ=None) -> LaunchPlan:
    try:
        return _plan(argv, strict=strict, environ=environ)
    except KLModeError as error:  # said in the installed release's flags
        raise KLModeError(compat.to_flags(str(error))) from None


def _plan(argv: Sequence[str], *, strict: bool = True, environ=None) -> LaunchPlan:
    """Parse ``argv`` (train_ppo_ray arguments plus kl-patches' flags) and validate the combination, before any
    work. The mode is ``--algo.kl.mode``, else ``KL_PATCHES_MODE``, else library (``resolve_mode``: a conflict is
    said once). Raises KLModeError for incompatible flags and, when ``strict``, for configurations the mode cannot
    make exact; OpenRLHF's own argument errors propagate as OpenRLHF raises them."""
    from kl_patches import terms

    namespace = launcher_parser().parse_args(list(argv))
    mode, origin = resolve_mode(getattr(namespace, MODE_FLAG[2:]), mode_flag(), default=LIBRARY, environ=environ)
    truncation = getattr(namespace, TRUNCATION_FLAG[2:])
    if truncation is not None:
        if mode != K1_RTG_LOSS:
            raise KLModeError(f"{TRUNCATION_FLAG} only applies to {MODE_FLAG} k1-rtg-loss (mode in effect: {mode})")
        truncation = terms.check_truncation(truncation)
    openrlhf_argv = strip_mode(argv)
    args = openrlhf_args(openrlhf_argv)
    notes: list[str] = []
    if origin != mode_flag() and mode != LIBRARY:
        notes.append(f"mode {mode} from {ENV_VAR}")
    kl = args.algo.kl
    if mode != LIBRARY and not kl.init_coef > 0:
        raise KLModeError(
            f"{MODE_FLAG} {mode} with --algo.kl.init_coef {kl.init_coef:g}: the KL is off, so the mode would change "
            f"nothing; set a positive --algo.kl.init_coef or drop {MODE_FLAG}")
    if mode == K1_IN_REWARD:
        if kl.use_loss:
            raise KLModeError(
                f"{MODE_FLAG} k1-in-reward puts the KL in the reward, but --algo.kl.use_loss moves it to the loss: "
                f"drop --algo.kl.use_loss, or use {MODE_FLAG} k1-rtg-loss")
        if kl.estimator != "k1":
            notes.append(f"--algo.kl.estimator {kl.estimator} is overridden: k1-in-reward uses k1 in the reward")
        for issue in reward_path_issues(args):
            notes.append(f"k1-in-reward is not exact with this configuration: {issue}")
        for reason in off_policy_reasons(args):
            notes.append(f"k1-in-reward is exact on-policy only and {reason}; OpenRLHF's per-token PPO ratio does not "
                         f"correct the prefix distribution: use {MODE_FLAG} k1-rtg-loss")
        if not compat.flavour().loss_batch_info:
            notes.append("k1-in-reward is not exact through this OpenRLHF release's step: its training_step "
                         "divides each micro-batch's loss by that micro-batch's own token count (masked_mean), a "
                         "ratio estimator over --train.micro_batch_size responses whatever the batch size (measured "
                         f"0.39 at micro-batch 1); use {MODE_FLAG} k1-rtg-loss")
        notes.append("k1-in-reward takes the sampler to be the actor: a vLLM/actor numerics mismatch biases it "
                     f"(k1-rtg-loss with {CORRECTION_FLAG} token corrects it)")
    normalizer = mu_source = None
    if mode == K1_RTG_LOSS:
        if not kl.use_loss:
            openrlhf_argv.append(compat.flag("algo.kl.use_loss"))
            args = openrlhf_args(openrlhf_argv)
            notes.append("k1-rtg-loss puts the KL in the loss: --algo.kl.use_loss turned on (the reward carries no KL)")
        if kl.estimator != "k1" or getattr(kl, "unbiased_gradient", False):
            notes.append("--algo.kl.estimator / --algo.kl.unbiased_gradient are ignored by k1-rtg-loss (its gradient "
                         "is the k1 reward-to-go surrogate; the logged kl is the k1 estimate)")
        from kl_patches.integrations.openrlhf.kl import fixed_normalizer, response_length

        normalizer = fixed_normalizer(args)
        notes.append(f"KL normaliser C = --train.batch_size {args.train.batch_size} x {response_length(args)} "
                     f"(max response length) = {normalizer:g}, fixed before sampling (OpenRLHF's token count is "
                     f"undone on the KL part)")
        if args.ds.ring_attn_size > 1 or args.ds.tensor_parallel_size > 1:
            notes.append("warning: --ds.ring_attn_size / --ds.tensor_parallel_size > 1 are not covered by kl-patches' "
                         "step audit (kl-patches check reports them as not covered)")
        if records_sampler_log_probs(args):
            mu_source = "rollout_log_probs"
        else:
            mu_source = "action_log_probs"
            if not getattr(args.train, "async_enable", False):
                notes.append(
                    f"warning: {CORRECTION_FLAG} is off, so OpenRLHF does not keep vLLM's log-probs and mu is the "
                    f"actor's recomputation (action_log_probs): exact only while vLLM and the actor agree "
                    f"numerically (measured 5.9 % / 23 % error at logit noise 0.05 / 0.2). Add {CORRECTION_FLAG} "
                    f"token (it also turns on OpenRLHF's TIS/mask correction of the policy loss, which is why "
                    f"kl-patches does not turn it on for you)")
    refused = refusals(mode, args)
    if refused and strict:
        raise KLModeError(compat.to_flags(f"{MODE_FLAG} {mode} cannot be exact here: ") +
                          " | ".join(map(str, refused)))
    notes = [compat.to_flags(note) for note in notes]
    return LaunchPlan(mode, openrlhf_argv, args, notes, origin, truncation, refused, normalizer, mu_source)
