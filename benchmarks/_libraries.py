"""The libraries' real KL loss paths, reached through each adapter's own helpers (never a re-implementation of a
library formula), in one shape the benchmarks share.

A :class:`LossPath` computes, for an ``AuditBatch`` of responses sampled from the core's tiny policy (its ``logp``
attached to the policy), the library's scalar training loss for that batch as one training batch, with the KL
coefficient 1 and zero task reward (the library computes the KL part only, as its ``audit()`` does), normalised
per response (a token-mean normaliser fixed at the number of responses), so that an exact configuration's expected
gradient is grad KL_seq itself. :func:`check_scale` verifies that convention on every run: the kl-patches mode of
each library must be exact with scale 1 on a small policy, otherwise the library is skipped with the reason.

TRL's loss recomputes log-probs through its own model (it does not take log-prob tensors), so its paths cannot be
fed the core's tabular policy: TRL is benchmarked end to end by ``trl_run.py`` and audited by ``bias_table.py``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

NOT_TENSOR_LEVEL = {
    "trl": "TRL's loss recomputes log-probs through its own model, so it cannot be fed the tabular policy's "
           "log-probs; TRL is covered end to end by trl_run.py and by the exact audit in bias_table.py",
}


@dataclass
class LossPath:
    library: str
    name: str  # the configuration as a user writes it
    mode: str  # "library" (unpatched) or a kl-patches mode
    make: Callable[[], Callable]  # -> batch -> scalar loss; called once, inside the first ``active()``
    label: str = ""
    _loss: Callable | None = None

    @contextlib.contextmanager
    def active(self) -> Iterator[Callable]:
        """The library in the state this path needs (the adapter enabled with the mode, or disabled), yielding the
        loss function; the previous state is restored after."""
        with _state(self.library, self.mode):
            if self._loss is None:
                self._loss = self.make()
            yield self._loss


@contextlib.contextmanager
def _state(library: str, mode: str):
    if library == "openrlhf":
        from kl_patches.integrations import openrlhf as adapter
        from kl_patches.integrations.openrlhf.placeholders import install_placeholders

        install_placeholders()  # flash_attn / vllm stand-ins where they are not installed (CPU)
        previous = adapter.enabled_mode()
        if mode == "library":
            adapter.disable()
        else:
            adapter.enable(mode)
        try:
            yield
        finally:
            adapter.disable()
            if previous is not None:
                adapter.enable(previous)
        return
    if library == "verl":
        # verl's modes are configuration values read by the plugin's patches (installed on ``import verl``); the
        # unpatched values go to verl's original functions
        from kl_patches.integrations.verl.audit import ensure_patched

        ensure_patched()
        yield
        return
    raise LookupError(f"no tensor-level loss paths for {library}: {NOT_TENSOR_LEVEL.get(library, 'unknown library')}")


def _verl(overrides: dict) -> Callable[[], Callable]:
    def make():
        from kl_patches.integrations.verl import audit

        settings = audit.KLSettings(**overrides)
        losses: dict[int, Callable] = {}

        def loss(batch):
            rows = batch.tokens.shape[0]
            if rows not in losses:  # the token-mean normaliser fixed at the number of responses: per-response mean
                losses[rows] = audit.make_verl_loss(settings, batch_num_tokens=float(rows), global_batch_size=rows)
            return losses[rows](batch)

        return loss

    return make


def _openrlhf(argv: tuple[str, ...]) -> Callable[[], Callable]:
    def make():
        from kl_patches.integrations.openrlhf import audit

        args = audit.audit_args(argv)
        return audit.openrlhf_loss(args)  # normaliser = number of responses

    return make


def _openrlhf_argv(*extra: str, group: int = 8) -> tuple[str, ...]:
    return ("--rollout.n_samples_per_prompt", str(group), *extra)


def loss_paths(library: str, group: int = 8) -> list[LossPath]:
    """The library's default KL configurations, its upstream fixes and the kl-patches modes."""
    if library == "verl":
        loss = dict(use_kl_loss=True, kl_loss_coef=1.0)
        return [
            LossPath("verl", "actor.kl_loss_type=low_var_kl (verl's default in-loss KL)", "library",
                     _verl({**loss, "kl_loss_type": "low_var_kl"})),
            LossPath("verl", "actor.kl_loss_type=low_var_kl+ (straight-through k2 gradient)", "library",
                     _verl({**loss, "kl_loss_type": "low_var_kl+"})),
            LossPath("verl", "algorithm.kl_penalty=kl, adv_estimator=rloo (k1 in reward)", "library",
                     _verl(dict(use_kl_in_reward=True, kl_penalty="kl", kl_coef=1.0, adv_estimator="rloo"))),
            LossPath("verl", "actor.kl_loss_type=k1-rtg-loss (kl-patches)", "k1-rtg-loss",
                     _verl({**loss, "kl_loss_type": "k1-rtg-loss"})),
            LossPath("verl", "algorithm.kl_penalty=k1-in-reward, adv_estimator=grpo (kl-patches)", "k1-in-reward",
                     _verl(dict(use_kl_in_reward=True, kl_penalty="k1-in-reward", kl_coef=1.0, adv_estimator="grpo"))),
        ]
    if library == "openrlhf":
        return [
            LossPath("openrlhf", "--algo.kl.use_loss --algo.kl.estimator k3 (GRPO-style)", "library",
                     _openrlhf(_openrlhf_argv("--algo.advantage.estimator", "group_norm", "--algo.kl.use_loss",
                                              "--algo.kl.estimator", "k3", group=group))),
            LossPath("openrlhf", "--algo.kl.use_loss --algo.kl.estimator k3 --algo.kl.unbiased_gradient", "library",
                     _openrlhf(_openrlhf_argv("--algo.advantage.estimator", "group_norm", "--algo.kl.use_loss",
                                              "--algo.kl.estimator", "k3", "--algo.kl.unbiased_gradient",
                                              group=group))),
            LossPath("openrlhf", "--algo.kl.estimator k1, rloo (k1 in reward)", "library",
                     _openrlhf(_openrlhf_argv("--algo.advantage.estimator", "rloo", "--algo.kl.estimator", "k1",
                                              group=group))),
            LossPath("openrlhf", "--algo.kl.mode k1-rtg-loss (kl-patches)", "k1-rtg-loss",
                     _openrlhf(_openrlhf_argv("--algo.advantage.estimator", "group_norm", "--algo.kl.use_loss",
                                              "--algo.kl.estimator", "k3", group=group))),
            LossPath("openrlhf", "--algo.kl.mode k1-in-reward, group_norm (kl-patches)", "k1-in-reward",
                     _openrlhf(_openrlhf_argv("--algo.advantage.estimator", "group_norm", "--algo.kl.estimator",
                                              "k1", group=group))),
        ]
    raise LookupError(f"no tensor-level loss paths for {library}: {NOT_TENSOR_LEVEL.get(library, 'unknown library')}")


def check_scale(path: LossPath) -> float:
    """Relative error of the path's expected gradient against grad KL_seq with scale 1 on a small policy, on-policy,
    groups of 2 (one call per enumerated group). An exact kl-patches mode must be ~1e-15; anything else means the
    per-response normalisation convention is not what the benchmark assumes."""
    from kl_patches.audit import PolicySpec, build_problem, compare, exact_kl_gradient, expected_gradient, per_group

    problem = build_problem(PolicySpec(vocab=3, horizon=2, seed=0), off_policy=False)
    with path.active() as loss:
        gradient = expected_gradient(problem, per_group(loss), group_size=2)
    return compare(gradient, exact_kl_gradient(problem)).rel_err


def checked_paths(library: str, group: int = 8) -> list[LossPath]:
    paths = loss_paths(library, group)
    for path in paths:
        if path.mode != "library":
            error = check_scale(path)
            if error > 1e-10:
                raise RuntimeError(f"{library} {path.name}: expected gradient is not grad KL_seq at scale 1 "
                                   f"(relative error {error:.2e}); the benchmark's normalisation convention does not "
                                   f"hold for this library version")
    return paths
