"""Training to a known optimum: does each KL configuration converge to pi* = argmax E[R] - beta * KL(pi || pi_ref)?

The task is small enough to know the answer. A tabular autoregressive policy over every response of length <= 3
(3 tokens + EOS, 40 responses) starts at pi_ref; the rule-based reward is the fraction of the response's
positions (out of the horizon) holding token 0. The optimum of E[R] - beta * KL(pi || pi_ref) is
pi*(y) ∝ pi_ref(y) exp(R(y) / beta), computed by enumeration, so KL(pi_theta || pi*) measures the distance to the
answer at every step.

Every configuration trains with the same task-reward gradient (REINFORCE with a leave-one-out baseline, and
per-decision importance weights when the samples are stale: exact in expectation in both regimes) plus
beta times its own KL loss: the core's reference losses for the library defaults and the upstream fixes, the two
kl-patches modes (``kl_patches.audit.reference.CELLS``), and each installed library's real loss path through its
adapter (``_libraries``: verl and OpenRLHF, whose loss code takes log-prob tensors; the library computes the KL
part with task reward 0 and the common task gradient is added; sampled dynamics only). Two dynamics, both recorded:

* ``sampled``: SGD on a batch of sampled responses per step (groups of 8), step size decaying as 1 / (1 + t/tau);
* ``exact``: the infinite-batch limit, SGD on the exact expected gradient (the audit engine's enumeration).

Two regimes: ``on`` (fresh samples from pi_theta) and ``stale`` (samples from the policy as it was when the
behaviour snapshot was last refreshed, every 4 steps: up to 3 updates old, as with asynchronous rollouts or PPO
epochs). Recorded per step: KL(pi_theta || pi*), the sequence KL to pi_ref and the expected reward.

    python benchmarks/convergence.py            # core + every library installed in this interpreter
    python benchmarks/convergence.py --quick    # a few steps (smoke test)
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

SCRIPT = "convergence"
VOCAB, HORIZON, BETA = 4, 3, 0.5
GROUP = 8  # responses per prompt group (leave-one-out baselines)
LAG = 4  # the stale regime refreshes its behaviour snapshot every LAG steps
REFERENCE_CONFIG = "k3 in loss (GRPO default)"  # the claim compares the kl-patches modes with this one

#: The core reference configurations trained, with the short label used in plots and tables.
CORE_CONFIGURATIONS = {
    "k1 in loss": "k1 in loss",
    "k3 in loss (GRPO default)": "k3 in loss (GRPO / verl low_var_kl)",
    "k3 value, k2 gradient (straight-through)": "k2-gradient in loss (verl k3+)",
    "k3 x token ratio (bias-corrected k3)": "k3 x token ratio (TRL bias correction)",
    "k2 gradient x detached token ratio": "k2-grad x detached ratio (OpenRLHF unbiased_gradient)",
    "k1 in reward (sequence sum)": "k1 in reward, sequence sum, no baseline",
    "k3 in reward": "k3 in reward",
    "k3 in reward and in loss": "k3 in reward and in loss",
    "k1-in-reward (kl-patches)": "kl-patches k1-in-reward",
    "k1-rtg-loss (kl-patches)": "kl-patches k1-rtg-loss",
}


@dataclass
class Settings:
    steps: int
    batch: int  # sampled responses per step
    lr: float
    tau: float  # step size lr / (1 + t / tau) in the sampled dynamics
    exact_lr: float
    seeds: tuple[int, ...]
    points: int  # recorded steps (log-spaced)


FULL = Settings(steps=2000, batch=64, lr=2.0, tau=200.0, exact_lr=2.0, seeds=(0, 1, 2), points=16)
QUICK = Settings(steps=12, batch=16, lr=2.0, tau=200.0, exact_lr=2.0, seeds=(0,), points=4)


@dataclass
class Configuration:
    library: str
    name: str  # the configuration's name in the audit (record.configuration)
    label: str
    loss: Callable | None  # AuditBatch -> (G,) KL losses with beta = 1 (None: given by ``context``)
    mode: str = "library"
    context: Callable | None = None  # -> context manager yielding the loss (a library in the right patch state)
    dynamics: tuple[str, ...] = ("sampled", "exact")

    def active(self):
        return contextlib.nullcontext(self.loss) if self.context is None else self.context()


class Task:
    """Enumerated responses, reference, reward and the optimum pi* of one seed."""

    def __init__(self, seed: int, vocab: int = VOCAB, horizon: int = HORIZON, beta: float = BETA):
        import torch

        from kl_patches.audit import TabularPolicy, enumerate_responses

        self.vocab, self.horizon, self.beta, self.seed = vocab, horizon, beta, seed
        self.tokens, self.mask = enumerate_responses(vocab, horizon)
        self.reward = ((self.tokens == 0) & self.mask).sum(-1).double() / horizon
        self.reference = TabularPolicy(vocab, horizon, seed=seed)
        self.reference.logits.requires_grad_(False)
        with torch.no_grad():
            self.ref_token_logp = self.reference.token_logprobs(self.tokens, self.mask)
            self.ref_seq = self.ref_token_logp.sum(-1)
            star = self.ref_seq + self.reward / beta
            self.star_seq = star - torch.logsumexp(star, 0)

    def new_policy(self):
        from kl_patches.audit import TabularPolicy

        policy = TabularPolicy(self.vocab, self.horizon, seed=self.seed)
        with __import__("torch").no_grad():
            policy.logits.copy_(self.reference.logits)  # RLHF starts the policy at the reference
        return policy

    def metrics(self, policy) -> dict:
        import torch

        with torch.no_grad():
            seq = policy.token_logprobs(self.tokens, self.mask).sum(-1)
            prob = seq.exp()
            return {
                "kl_to_optimum": float((prob * (seq - self.star_seq)).sum()),
                "kl_to_reference": float((prob * (seq - self.ref_seq)).sum()),
                "expected_reward": float((prob * self.reward).sum()),
            }

    def optimum(self) -> dict:
        import torch

        prob = self.star_seq.exp()
        return {"kl_to_optimum": 0.0, "kl_to_reference": float((prob * (self.star_seq - self.ref_seq)).sum()),
                "expected_reward": float((prob * self.reward).sum()),
                "reference_reward": float((self.ref_seq.exp() * self.reward).sum()),
                "objective": float((prob * self.reward).sum()
                                   - self.beta * (prob * (self.star_seq - self.ref_seq)).sum())
                if torch.isfinite(prob).all() else math.nan}


def task_loss(batch, reward):
    """REINFORCE on the task reward with a leave-one-out baseline; off-policy, per-decision importance weights
    rho_{1:t} (the terminal reward weighted by rho_{1:T}, the baseline by rho_{1:t}): exact in expectation."""
    import torch

    from kl_patches import terms

    rho = terms.prefix_importance_weights(batch.logp, batch.behaviour_logp, batch.mask)
    last = (batch.mask.sum(-1) - 1).clamp(min=0)[:, None]
    rho_end = rho.gather(1, last)
    rewards = reward[batch.rows]
    baseline = terms.leave_one_out_baseline(rewards, batch.group_ids)
    coefficient = torch.where(batch.mask, rho_end * rewards[:, None] - rho * baseline[:, None], 0.0)
    logp = torch.where(batch.mask, batch.logp, torch.zeros((), dtype=batch.logp.dtype))
    per_row = -(logp * coefficient.detach()).sum(-1)
    return per_row.reshape(-1, batch.group_size).mean(-1)


def make_batch(task: Task, policy, behaviour_logits, rows, group_size: int, on_policy: bool):
    import torch

    from kl_patches.audit import AuditBatch

    logp = policy.token_logprobs(task.tokens, task.mask)
    if on_policy:
        behaviour_logp = logp.detach()
    else:
        behaviour_logp = behaviour_token_logp(task, behaviour_logits)
    num_groups = rows.shape[0] // group_size
    return AuditBatch(
        tokens=task.tokens[rows], mask=task.mask[rows], logp=logp[rows], ref_logp=task.ref_token_logp[rows],
        behaviour_logp=behaviour_logp[rows], group_ids=torch.arange(num_groups).repeat_interleave(group_size),
        rows=rows, group_size=group_size, on_policy=on_policy,
    )


def behaviour_token_logp(task: Task, logits):
    import torch

    from kl_patches.audit import TabularPolicy

    snapshot = TabularPolicy(task.vocab, task.horizon)
    with torch.no_grad():
        snapshot.logits.copy_(logits)
        return snapshot.token_logprobs(task.tokens, task.mask)


def record_steps(steps: int, points: int) -> list[int]:
    marks = {0, steps}
    for i in range(points):
        marks.add(int(round(math.exp(math.log(steps) * i / max(points - 1, 1)))))
    return sorted(m for m in marks if 0 <= m <= steps)


def train(task: Task, config: Configuration, regime: str, dynamics: str, settings: Settings, seed: int):
    """One run; returns {step: metrics} at the recorded steps (step = number of updates done)."""
    with config.active() as kl_loss:
        return _train(task, kl_loss, regime, dynamics, settings, seed)


def _train(task: Task, kl_loss, regime: str, dynamics: str, settings: Settings, seed: int):
    import torch

    from kl_patches.audit import expected_gradient
    from kl_patches.audit.engine import AuditProblem
    from kl_patches.audit.policies import PolicySpec, TabularPolicy

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(10_000 + seed)
    policy = task.new_policy()
    on_policy = regime == "on"
    behaviour_logits = policy.logits.detach().clone()
    marks = set(record_steps(settings.steps, settings.points))
    trajectory = {}
    for step in range(settings.steps + 1):
        if step in marks:
            trajectory[step] = task.metrics(policy)
        if step == settings.steps:
            break
        if not on_policy and step % LAG == 0:
            behaviour_logits = policy.logits.detach().clone()
        policy.zero_grad()
        if dynamics == "sampled":
            with torch.no_grad():
                sampler = (policy.token_logprobs(task.tokens, task.mask) if on_policy
                           else behaviour_token_logp(task, behaviour_logits))
                probs = sampler.sum(-1).exp()
            rows = torch.multinomial(probs, settings.batch, replacement=True, generator=generator)
            batch = make_batch(task, policy, behaviour_logits, rows, GROUP, on_policy)
            loss = task_loss(batch, task.reward).mean() + task.beta * kl_loss(batch).mean()
            loss.backward()
            lr = settings.lr / (1.0 + step / settings.tau)
        else:
            # infinite batch: grad of -E[R] by autograd on the enumeration, plus beta * E[grad KL loss] from the
            # audit engine (groups of 2 enumerated exactly; the expectation does not depend on the group size)
            behaviour = None
            if not on_policy:
                behaviour = TabularPolicy(task.vocab, task.horizon)
                with torch.no_grad():
                    behaviour.logits.copy_(behaviour_logits)
                behaviour.logits.requires_grad_(False)
            problem = AuditProblem(PolicySpec(vocab=task.vocab, horizon=task.horizon, seed=task.seed), policy,
                                   task.reference, behaviour, task.tokens, task.mask)
            kl_grad = expected_gradient(problem, kl_loss, group_size=2).gradient
            seq = policy.token_logprobs(task.tokens, task.mask).sum(-1)
            (-(seq.exp() * task.reward).sum()).backward()
            policy.logits.grad += task.beta * kl_grad.reshape(policy.logits.shape)
            lr = settings.exact_lr
        with torch.no_grad():
            policy.logits -= lr * policy.logits.grad
        if not torch.isfinite(policy.logits).all():
            trajectory[step + 1] = {k: math.nan for k in ("kl_to_optimum", "kl_to_reference", "expected_reward")}
            break
    return trajectory


def core_configurations() -> list[Configuration]:
    from kl_patches.audit.reference import CELLS

    cells = {cell.configuration: cell for cell in CELLS}
    return [Configuration("core", name, label, cells[name].loss, cells[name].mode)
            for name, label in CORE_CONFIGURATIONS.items()]


def library_configurations(library: str) -> list[Configuration]:
    """The library's real loss paths (``_libraries``: the adapters' helpers, the library's own code), trained with
    sampled batches only: the exact dynamics would call the library once per enumerated group at every step."""
    import _libraries

    return [Configuration(library, path.name, path.name, None, path.mode, context=path.active,
                          dynamics=("sampled",))
            for path in _libraries.checked_paths(library, group=GROUP)]


def run(rows: _common.Rows, configs: list[Configuration], settings: Settings, library: str) -> None:
    tasks = {seed: Task(seed) for seed in settings.seeds}
    for seed, task in tasks.items():
        for metric, value in task.optimum().items():
            rows.add(what="convergence-optimum", library=library, configuration="pi*", metric=metric, unit="",
                     values=value, x_name="seed", x=seed, config=task_config(settings))
    for dynamics in ("sampled", "exact"):
        for regime in ("on", "stale"):
            for config in configs:
                if dynamics not in config.dynamics:
                    continue
                started = time.perf_counter()
                runs = [train(tasks[seed], config, regime, dynamics, settings, seed) for seed in settings.seeds]
                steps = sorted(set.intersection(*(set(r) for r in runs)))
                for step in steps:
                    for metric in ("kl_to_optimum", "kl_to_reference", "expected_reward"):
                        rows.add(what=f"convergence-{dynamics}-{regime}", library=library,
                                 configuration=config.name, metric=metric, unit="nats" if "kl" in metric else "reward",
                                 values=[r[step][metric] for r in runs], x_name="step", x=step,
                                 config={"mode": config.mode, "seeds": len(runs),
                                         **({"label": config.label} if config.label != config.name else {})})
                final = [r[steps[-1]]["kl_to_optimum"] for r in runs]
                print(f"[{SCRIPT}] {library} {dynamics:7s} {regime:5s} {config.label:55s} "
                      f"KL(pi||pi*) final median {_common.quantiles(final)[0]:.2e} "
                      f"({time.perf_counter() - started:.1f} s)")


def task_config(settings: Settings) -> dict:
    return {"vocab": VOCAB, "horizon": HORIZON, "beta": BETA, "group": GROUP, "lag": LAG,
            "steps": settings.steps, "batch": settings.batch, "lr": settings.lr, "tau": settings.tau,
            "exact_lr": settings.exact_lr, "reward": "fraction of the horizon's positions holding token 0"}


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    written = plot_regimes(rows, out)
    for dynamics in ("sampled", "exact"):
        panels = [(regime, metric) for regime in ("on", "stale")
                  for metric in ("kl_to_optimum", "kl_to_reference", "expected_reward")]
        mine = [r for r in rows if r["what"].startswith(f"convergence-{dynamics}-")]
        if not mine:
            continue
        fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
        configurations = list(dict.fromkeys((r["library"], r["configuration"]) for r in mine))
        core_colours, library_colours = plt.get_cmap("tab10"), plt.get_cmap("Dark2")
        optimum = {r["metric"]: float(r["median"]) for r in rows
                   if r["what"] == "convergence-optimum" and r["x"] == "0"}
        for axis, (regime, metric) in zip(axes.flat, panels):
            library_index = 0
            for index, (library, configuration) in enumerate(configurations):
                if library == "core":
                    colour = core_colours(index % 10)
                else:
                    colour = library_colours(library_index % 8)
                    library_index += 1
                line = [r for r in mine if r["what"] == f"convergence-{dynamics}-{regime}"
                        and r["library"] == library and r["configuration"] == configuration and r["metric"] == metric]
                if not line:
                    continue
                xs = [max(int(r["x"]), 1) for r in line]
                label = _common.json.loads(line[0]["config"]).get("label", configuration)
                if library != "core":
                    label = f"{library}: {label}"
                style = "-" if "kl-patches" in label or library != "core" else "--"
                if library != "core":
                    style = ":"
                axis.plot(xs, [float(r["median"]) for r in line], style, color=colour,
                          label=label, linewidth=2.2 if "kl-patches" in label else 1.2)
                axis.fill_between(xs, [float(r["p20"]) for r in line], [float(r["p80"]) for r in line],
                                  color=colour, alpha=0.12)
            if metric == "kl_to_optimum":
                axis.set_yscale("log")
            elif metric in optimum:
                axis.axhline(optimum[metric], color="black", linewidth=1, linestyle=":", label="pi* (seed 0)")
            axis.set_xscale("log")
            axis.set_title(f"{metric.replace('_', ' ')}, {regime}-policy samples", fontsize=10)
            axis.set_xlabel("update step")
            axis.grid(alpha=0.3)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
        title = ("sampled batches, step size decaying as 1/(1+t/tau)" if dynamics == "sampled"
                 else "exact expected gradient (infinite batch)")
        fig.suptitle(f"Convergence to pi* = argmax E[R] - beta KL: {title}; median over seeds, band p20-p80",
                     fontsize=11)
        fig.tight_layout(rect=(0, 0.1, 1, 0.96))
        path = out / f"convergence_{dynamics}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------------------------
# Regimes: lag, a systematic sampler/trainer mismatch, asynchronous generation (issue 15)
# ----------------------------------------------------------------------------------------------------------------
#
# The task gradient is exact in every regime run (-grad E_pi[R] by enumeration), so the only thing that differs
# between rows is the KL term's estimator and the log-probs it takes as mu. The sampler mu_t is:
#   lag-k      the policy as it was at the last refresh, every k steps (PPO epochs; k = 1 is on-policy);
#   noise      pi_theta's logits + a fixed N(0, NOISE^2) perturbation per state (an engine's different numerics);
#   temperature  pi_theta's logits / TEMPERATURE, applied by the sampler only;
#   top-p      pi_theta restricted to its top-p nucleus per state (support truncated: no weight can correct it);
#   async      the policy exactly ASYNC_LAG steps old at every step (asynchronous generation at a fixed lag).
# mu = "sampler": the KL term gets the sampler's log-probs; mu = "trainer": the trainer's recomputation with the
# weights it holds now (what TRL, verl and OpenRLHF use as old log-probs when the engine's are not passed through);
# in the lag regimes the trainer's old log-probs are the snapshot's, i.e. the sampler's.

NOISE, TEMPERATURE, TOP_P, ASYNC_LAG = 0.3, 0.8, 0.9, 4
REGIMES = ("lag-1", "lag-4", "lag-16", "noise", "temperature", "top-p", "async")
REGIME_TITLES = {
    "lag-1": "on-policy (lag 1)", "lag-4": "behaviour snapshot refreshed every 4 steps",
    "lag-16": "behaviour snapshot refreshed every 16 steps",
    "noise": f"sampler logits + fixed per-state noise N(0, {NOISE}^2) (engine numerics)",
    "temperature": f"sampler-only temperature {TEMPERATURE}", "top-p": f"sampler-only top-p {TOP_P}",
    "async": f"asynchronous generation at a fixed lag of {ASYNC_LAG} steps",
}
#: (row label, reference cell, mu source, group size of the exact expectation)
REGIME_ROWS = (
    ("unpatched k3 in loss (GRPO / verl low_var_kl)", "k3 in loss (GRPO default)", "trainer", 1),
    ("unpatched k3 x token ratio (TRL bias correction)", "k3 x token ratio (bias-corrected k3)", "trainer", 1),
    ("unpatched k2-grad x detached ratio (OpenRLHF)", "k2 gradient x detached token ratio", "trainer", 1),
    ("unpatched k1 in reward, sequence sum", "k1 in reward (sequence sum)", "trainer", 1),
    ("kl-patches k1-in-reward, mu = sampler", "k1-in-reward (kl-patches)", "sampler", 2),
    ("kl-patches k1-rtg-loss, mu = sampler", "k1-rtg-loss (kl-patches)", "sampler", 1),
    ("kl-patches k1-rtg-loss, mu = trainer recomputation", "k1-rtg-loss (kl-patches)", "trainer", 1),
    ("kl-patches k1-rtg-loss, mu = sampler, truncation 2", "truncated-2", "sampler", 1),
)


@dataclass
class RegimeSettings:
    steps: int
    batch: int
    lr: float
    tau: float
    exact_lr: float
    seeds: tuple[int, ...]
    points: int
    regimes: tuple[str, ...]


REGIMES_FULL = RegimeSettings(steps=150, batch=64, lr=2.0, tau=50.0, exact_lr=3.0, seeds=(0, 1, 2), points=8,
                              regimes=REGIMES)
REGIMES_QUICK = RegimeSettings(steps=4, batch=16, lr=2.0, tau=100.0, exact_lr=2.0, seeds=(0,), points=3,
                               regimes=("lag-4", "top-p"))
QUICK_ROWS = (0, 5, 6)  # --quick: k3 in loss, k1-rtg-loss with the sampler's and with the trainer's log-probs


def regime_loss(cell: str):
    from kl_patches.audit import reference

    if cell == "truncated-2":
        return reference.mode_k1_rtg_loss(truncation=2.0)
    return {c.configuration: c for c in reference.CELLS}[cell].loss


def sampler_logits(regime: str, logits, history, step: int, state_noise):
    """The sampler's per-state logits (num_codes, V) at this step (-inf outside a top-p nucleus)."""
    import torch

    if regime.startswith("lag-"):
        lag = int(regime.split("-")[1])
        return history[step - step % lag]
    if regime == "async":
        return history[max(step - ASYNC_LAG, 0)]
    if regime == "noise":
        return logits + state_noise
    if regime == "temperature":
        return logits / TEMPERATURE
    if regime == "top-p":
        probs = torch.softmax(logits, -1)
        ordered, order = probs.sort(-1, descending=True)
        before = ordered.cumsum(-1) - ordered  # mass of the more likely tokens
        keep_sorted = before < TOP_P  # the smallest set reaching TOP_P
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        return logits.masked_fill(~keep, -math.inf)
    raise ValueError(regime)


def regime_train(task: Task, row, regime: str, dynamics: str, settings: RegimeSettings, seed: int) -> dict:
    import dataclasses

    import torch

    from kl_patches.audit import AuditBatch, TabularPolicy, expected_gradient
    from kl_patches.audit.engine import AuditProblem
    from kl_patches.audit.policies import PolicySpec

    label, cell, source, group = row
    if regime.startswith("lag-"):
        source = "sampler"  # the trainer's old log-probs are the snapshot's, computed when it sampled
    kl_loss = regime_loss(cell)

    def with_source(loss):
        if source == "sampler":
            return loss

        def recomputed(batch):  # the trainer's recomputation with its current weights: ratio 1, no correction
            return loss(dataclasses.replace(batch, behaviour_logp=batch.logp.detach()))

        return recomputed

    kl_loss = with_source(kl_loss)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(20_000 + seed)
    noise_generator = torch.Generator().manual_seed(30_000 + seed)
    policy = task.new_policy()
    state_noise = NOISE * torch.randn(policy.logits.shape, generator=noise_generator, dtype=torch.float64)
    marks = set(record_steps(settings.steps, settings.points))
    history = {}
    trajectory = {}
    sampler = TabularPolicy(task.vocab, task.horizon)
    sampler.logits.requires_grad_(False)
    for step in range(settings.steps + 1):
        if step in marks:
            trajectory[step] = task.metrics(policy)
        if step == settings.steps:
            break
        history[step] = policy.logits.detach().clone()
        with torch.no_grad():
            sampler.logits.copy_(sampler_logits(regime, policy.logits.detach(), history, step, state_noise))
            sampler_logp = sampler.token_logprobs(task.tokens, task.mask)
            probs = sampler_logp.sum(-1).exp()
        support = probs > 0
        policy.zero_grad()
        seq = policy.token_logprobs(task.tokens, task.mask).sum(-1)
        (-(seq.exp() * task.reward).sum()).backward()  # exact task gradient in every run
        task_grad = policy.logits.grad.detach().clone()
        policy.zero_grad()
        if dynamics == "exact":
            problem = AuditProblem(PolicySpec(vocab=task.vocab, horizon=task.horizon, seed=task.seed), policy,
                                   task.reference, sampler, task.tokens[support], task.mask[support])
            kl_grad = expected_gradient(problem, kl_loss, group_size=group).gradient.reshape(policy.logits.shape)
            lr = settings.exact_lr
        else:
            rows = torch.multinomial(probs, settings.batch, replacement=True, generator=generator)
            logp = policy.token_logprobs(task.tokens, task.mask)
            groups = settings.batch // GROUP
            batch = AuditBatch(tokens=task.tokens[rows], mask=task.mask[rows], logp=logp[rows],
                               ref_logp=task.ref_token_logp[rows], behaviour_logp=sampler_logp[rows],
                               group_ids=torch.arange(groups).repeat_interleave(GROUP), rows=rows,
                               group_size=GROUP, on_policy=False)
            kl_loss(batch).mean().backward()
            kl_grad = policy.logits.grad.detach().clone()
            policy.zero_grad()
            lr = settings.lr / (1.0 + step / settings.tau)
        with torch.no_grad():
            policy.logits -= lr * (task_grad + task.beta * kl_grad)
        if not torch.isfinite(policy.logits).all():
            trajectory[step + 1] = {k: math.nan for k in ("kl_to_optimum", "kl_to_reference", "expected_reward")}
            break
    return trajectory


def run_regimes(rows: _common.Rows, settings: RegimeSettings, dynamics_list=("exact", "sampled")) -> None:
    tasks = {seed: Task(seed) for seed in settings.seeds}
    for regime in settings.regimes:
        for dynamics in dynamics_list:
            for index, row in enumerate(REGIME_ROWS):
                if settings is REGIMES_QUICK and index not in QUICK_ROWS:
                    continue
                label, cell, source, group = row
                if regime.startswith("lag-") and source == "trainer" and cell == "k1-rtg-loss (kl-patches)":
                    continue  # the same run as mu = sampler there
                started = time.perf_counter()
                runs = [regime_train(tasks[s], row, regime, dynamics, settings, s) for s in settings.seeds]
                steps = sorted(set.intersection(*(set(r) for r in runs)))
                for step in steps:
                    for metric in ("kl_to_optimum", "kl_to_reference", "expected_reward"):
                        rows.add(what=f"regime-{regime}-{dynamics}", library="core", configuration=label,
                                 metric=metric, unit="nats" if "kl" in metric else "reward",
                                 values=[r[step][metric] for r in runs], x_name="step", x=step,
                                 config={"regime": regime, "dynamics": dynamics, "cell": cell, "mu": source,
                                         "seeds": len(runs), "steps": settings.steps, "batch": settings.batch,
                                         "lr": settings.lr if dynamics == "sampled" else settings.exact_lr,
                                         "tau": settings.tau, "title": REGIME_TITLES[regime]})
                final = [r[steps[-1]]["kl_to_optimum"] for r in runs]
                print(f"[{SCRIPT}] regime {regime:11s} {dynamics:7s} {label:55s} KL(pi||pi*) final median "
                      f"{_common.quantiles(final)[0]:.2e} ({time.perf_counter() - started:.1f} s)")


def plot_regimes(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    written = []
    regimes = list(dict.fromkeys(r["what"].split("-", 1)[1].rsplit("-", 1)[0] for r in rows
                                 if r["what"].startswith("regime-")))
    colours = plt.get_cmap("tab10")
    labels = [row[0] for row in REGIME_ROWS]
    for regime in regimes:
        fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
        for i, dynamics in enumerate(("exact", "sampled")):
            mine = [r for r in rows if r["what"] == f"regime-{regime}-{dynamics}"]
            for j, metric in enumerate(("kl_to_optimum", "kl_to_reference", "expected_reward")):
                axis = axes[i, j]
                for index, label in enumerate(labels):
                    line = [r for r in mine if r["configuration"] == label and r["metric"] == metric]
                    if not line:
                        continue
                    xs = [max(int(r["x"]), 1) for r in line]
                    axis.plot(xs, [float(r["median"]) for r in line], "-" if "kl-patches" in label else "--",
                              color=colours(index % 10), label=label, linewidth=2 if "kl-patches" in label else 1.2)
                    axis.fill_between(xs, [float(r["p20"]) for r in line], [float(r["p80"]) for r in line],
                                      color=colours(index % 10), alpha=0.12)
                if metric == "kl_to_optimum":
                    axis.set_yscale("log")
                axis.set_xscale("log")
                axis.set_title(f"{metric.replace('_', ' ')}, {dynamics}", fontsize=10)
                axis.set_xlabel("update step")
                axis.grid(alpha=0.3)
        handles, names = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=3, fontsize=8)
        fig.suptitle(f"Convergence to pi*, regime: {REGIME_TITLES.get(regime, regime)}; median over seeds, p20-p80",
                     fontsize=11)
        fig.tight_layout(rect=(0, 0.1, 1, 0.96))
        path = out / f"convergence_regime_{regime}.png"
        fig.savefig(path, dpi=70)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    import torch

    torch.set_num_threads(1)  # tiny tensors: threading only adds noise on a shared machine
    parser = _common.parser(__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("classic", "regimes"),
                        help="run only the classic on/stale study or only the regimes (default both)")
    parser.add_argument("--regime-dynamics", choices=("exact", "sampled"),
                        help="with --only regimes: run one dynamics and keep the other's rows")
    args = parser.parse_args(argv)
    coverage, adapters = _common.resolve_coverage(args.libraries)
    rows = _common.Rows(SCRIPT, args.out)
    settings = QUICK if args.quick else FULL
    if not args.plot_only and args.only and "core" in coverage.covered:
        # a partial run keeps the core rows of the other study (the CSV is replaced per library)
        if args.only == "classic":
            def keep(what):
                return what.startswith("regime-")
        elif args.regime_dynamics:
            def keep(what):
                return not (what.startswith("regime-") and what.endswith(f"-{args.regime_dynamics}"))
        else:
            def keep(what):
                return not what.startswith("regime-")
    if not args.plot_only and args.only != "classic" and "core" in coverage.covered:
        dynamics = (args.regime_dynamics,) if args.regime_dynamics else ("exact", "sampled")
        run_regimes(rows, REGIMES_QUICK if args.quick else REGIMES_FULL, dynamics)
    if not args.plot_only and args.only != "regimes":
        for library in list(coverage.covered):
            try:
                configs = core_configurations() if library == "core" else library_configurations(library)
            except Exception as err:  # noqa: BLE001 - reported as skipped, never silently
                coverage.skip(library, f"{type(err).__name__}: {err}")
                continue
            run(rows, configs, settings, library)
    if not args.plot_only and args.only and "core" in coverage.covered:
        # read at the end, so that another partial run that finished meanwhile is kept too
        rows.rows += [r for r in _common.read_rows(rows.path) if r["library"] == "core" and keep(r["what"])]
    _common.finish(rows, coverage, args, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
