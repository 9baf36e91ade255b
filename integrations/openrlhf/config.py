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

from kl_patches.modes import K1_IN_REWARD, K1_RTG_LOSS, LIBRARY, MODES, KLModeError
from kl_patches.patching import PatchError, installed_version

CLI_MODULE = "openrlhf.cli.train_ppo_ray"
MODE_FLAG = "--algo.kl.mode"

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
    """OpenRLHF's parser plus ``--algo.kl.mode``: every train_ppo_ray argument is accepted, unknown ones rejected."""
    parser = openrlhf_parser()
    parser.prog = "kl-patches-openrlhf"
    parser.description = ("OpenRLHF's train_ppo_ray with the exact sequence-level KL gradient of kl-patches in "
                          "every Ray process. All train_ppo_ray arguments, plus --algo.kl.mode.")
    parser.add_argument(
        MODE_FLAG, choices=MODES, default=LIBRARY,
        help="library: OpenRLHF's own KL, unchanged; k1-in-reward: force the k1 estimator in the reward "
             "(exact on-policy); k1-rtg-loss: the k1 reward-to-go loss with per-decision importance weights "
             "(exact on- and off-policy; turns on --algo.kl.use_loss)",
    )
    return parser


def strip_mode(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--algo.kl.mode X`` / ``--algo.kl.mode=X`` (OpenRLHF does not know the flag)."""
    out, skip = [], False
    for index, item in enumerate(argv):
        if skip:
            skip = False
            continue
        if item == MODE_FLAG:
            skip = index + 1 < len(argv)
            continue
        if item.startswith(MODE_FLAG + "="):
            continue
        out.append(item)
    return out


def openrlhf_args(argv: Sequence[str]):
    """The nested arguments ``train`` receives for ``train_ppo_ray <argv>``, after all of OpenRLHF's own checks
    (an AssertionError or SystemExit from them propagates). Needs neither Ray nor a GPU."""
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
        return captured.value
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
    return issues


@dataclass
class LaunchPlan:
    """What the launcher will run: the mode, OpenRLHF's argv, its parsed arguments and what was changed or noted."""

    mode: str
    argv: list[str]
    args: object
    notes: list[str] = field(default_factory=list)


def plan(argv: Sequence[str]) -> LaunchPlan:
    """Parse ``argv`` (train_ppo_ray arguments plus ``--algo.kl.mode``) and validate the combination, before any work.
    Raises KLModeError for incompatible flags; OpenRLHF's own argument errors propagate as OpenRLHF raises them."""
    namespace = launcher_parser().parse_args(list(argv))
    mode = getattr(namespace, MODE_FLAG[2:])
    openrlhf_argv = strip_mode(argv)
    args = openrlhf_args(openrlhf_argv)
    notes: list[str] = []
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
    if mode == K1_RTG_LOSS:
        if not kl.use_loss:
            openrlhf_argv.append("--algo.kl.use_loss")
            args = openrlhf_args(openrlhf_argv)
            notes.append("k1-rtg-loss puts the KL in the loss: --algo.kl.use_loss turned on (the reward carries no KL)")
        if kl.estimator != "k1" or getattr(kl, "unbiased_gradient", False):
            notes.append("--algo.kl.estimator / --algo.kl.unbiased_gradient are ignored by k1-rtg-loss (its gradient "
                         "is the k1 reward-to-go surrogate; the logged kl is the k1 estimate)")
    return LaunchPlan(mode, openrlhf_argv, args, notes)
