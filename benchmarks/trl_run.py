"""A real ``trl.GRPOTrainer.train()`` on CPU: TRL's default KL versus the kl-patches modes, three seeds.

A tiny Llama (built from a config in code, 2 layers, width 32) over a 7-token vocabulary (EOS, a, b, c, d, p, q) and
a WordLevel tokenizer; two prompts ("p q p", "q p q"); completions of at most 4 tokens; the rule-based reward is
the fraction of the 4 completion positions holding "a". Because every completion can be enumerated
(1 + 6 + 36 + 216 + 1296 = 1555 per prompt), the metrics, recorded every 4 optimisation steps, are exact, not sampled:

* ``kl_to_reference``: the sequence KL(pi_theta || pi_ref), mean over the two prompts;
* ``expected_reward``: E_pi[R];
* ``objective``: E_pi[R] - beta * KL, the objective GRPO with a KL penalty states;
* ``kl_to_optimum``: KL(pi_theta || pi*), pi*(y|x) ∝ pi_ref(y|x) exp(R(y) / beta) (the objective's maximiser).

Configurations (same seeds, same data order, same everything else): TRL's own ``GRPOTrainer`` with ``beta > 0``
(k3 in the loss with ``use_bias_correction_kl=True``, TRL's defaults; and with ``use_bias_correction_kl=False``,
the GRPO paper's k3 in the loss and TRL's default before 1.10), and kl-patches' drop-in ``GRPOTrainer``
(``kl_patches.integrations.trl``) with ``kl_mode`` = ``k1-in-reward`` and ``k1-rtg-loss``. ``scale_rewards="none"``
so that the task part of the gradient is that of E[R] (TRL's default per-group std scaling would rescale the
reward per prompt and change the objective itself); everything else is TRL's default except the learning rate.

    python benchmarks/trl_run.py            # needs trl and kl-patches' TRL adapter (the trl venv / nox session)
    python benchmarks/trl_run.py --quick    # 3 steps, one seed (smoke test)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

SCRIPT = "trl_run"
WORDS = ("<eos>", "a", "b", "c", "d", "p", "q")  # id 0 = EOS = pad
PROMPTS = ("p q p", "q p q")
COMPLETION_LENGTH = 4
BETA = 0.2
LEARNING_RATE = 3e-3
BATCH = 32  # completions per step: 4 groups of 8
CONFIGURATIONS = {
    "TRL default: k3 in loss (bias-corrected)": "library",
    "TRL k3 in loss, use_bias_correction_kl=False": "library-uncorrected",
    "kl-patches k1-in-reward": "k1-in-reward",
    "kl-patches k1-rtg-loss": "k1-rtg-loss",
}
METRICS = ("kl_to_reference", "expected_reward", "objective", "kl_to_optimum")


def reward_a(completions, **_):
    """Rule-based reward: the fraction of the completion positions holding "a"."""
    return [text.split().count("a") / COMPLETION_LENGTH for text in completions]


def build_model_dir(folder: Path, seed: int) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer_model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<eos>"))
    tokenizer_model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer_model, pad_token="<eos>", eos_token="<eos>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16,
                         pad_token_id=0, eos_token_id=0, bos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    path = folder / f"tiny-llama-seed{seed}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class ExactMetrics:
    """Exact sequence-level metrics of a causal LM over every completion of every prompt."""

    def __init__(self, tokenizer, reference_model):
        import torch

        from kl_patches.audit import enumerate_responses

        self.tokens, self.mask = enumerate_responses(len(WORDS), COMPLETION_LENGTH, eos_id=0, pad_id=0)
        self.prompts = [torch.tensor(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
        body = self.tokens.clone()
        self.reward = ((body == WORDS.index("a")) & self.mask).sum(-1).double() / COMPLETION_LENGTH
        self.ref = self.sequence_logprobs(reference_model)
        self.star = [torch.log_softmax(ref + self.reward / BETA, dim=0) for ref in self.ref]

    def sequence_logprobs(self, model) -> list:
        import torch

        was_training = model.training
        model.eval()
        out = []
        with torch.no_grad():
            for prompt in self.prompts:
                n = self.tokens.shape[0]
                input_ids = torch.cat([prompt.expand(n, -1), self.tokens], dim=1)
                logits = model(input_ids=input_ids).logits.double()
                start = prompt.shape[0] - 1
                logp = torch.log_softmax(logits[:, start:start + COMPLETION_LENGTH], dim=-1)
                chosen = logp.gather(-1, self.tokens.unsqueeze(-1)).squeeze(-1)
                out.append(torch.where(self.mask, chosen, 0.0).sum(-1))
        model.train(was_training)
        return out

    def __call__(self, model) -> dict:
        seqs = self.sequence_logprobs(model)
        values = {metric: 0.0 for metric in METRICS}
        for seq, ref, star in zip(seqs, self.ref, self.star):
            prob = seq.exp()
            kl = float((prob * (seq - ref)).sum())
            reward = float((prob * self.reward).sum())
            values["kl_to_reference"] += kl / len(seqs)
            values["expected_reward"] += reward / len(seqs)
            values["objective"] += (reward - BETA * kl) / len(seqs)
            values["kl_to_optimum"] += float((prob * (seq - star)).sum()) / len(seqs)
        return values

    def optimum(self) -> dict:
        values = {metric: 0.0 for metric in METRICS}
        for ref, star in zip(self.ref, self.star):
            prob = star.exp()
            kl = float((prob * (star - ref)).sum())
            reward = float((prob * self.reward).sum())
            values["kl_to_reference"] += kl / len(self.ref)
            values["expected_reward"] += reward / len(self.ref)
            values["objective"] += (reward - BETA * kl) / len(self.ref)
        return values


def train_once(model_dir: Path, mode: str, seed: int, steps: int, out_dir: Path, every: int = 1):
    """One GRPO run; returns ({step: exact metrics} every ``every`` steps and at the end, wall seconds of train()
    without the metric evaluations, the optimum's metrics)."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    metrics = ExactMetrics(tokenizer, reference)
    trajectory: dict[int, dict] = {}

    measuring = [0.0]

    class Record(TrainerCallback):
        def measure(self, step, model):
            started = time.perf_counter()
            trajectory[step] = metrics(model)
            measuring[0] += time.perf_counter() - started

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.measure(0, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 or state.global_step == steps:
                self.measure(state.global_step, model)

    common = dict(
        output_dir=str(out_dir), beta=BETA, max_completion_length=COMPLETION_LENGTH, num_generations=8,
        per_device_train_batch_size=BATCH, learning_rate=LEARNING_RATE, max_steps=steps, scale_rewards="none",
        logging_steps=10, report_to=[], use_cpu=True, save_strategy="no", seed=seed, data_seed=seed,
        disable_tqdm=True, log_completions=False, top_k=0,
    )
    if mode.startswith("library"):
        # TRL's own classes: k3 in the loss, times the token ratio by default (use_bias_correction_kl=True);
        # without the correction it is the GRPO paper's (and TRL < 1.10's default) k3 in the loss
        config_class, trainer_class = trl.GRPOConfig, trl.GRPOTrainer
        extra = {"use_bias_correction_kl": mode == "library"}
    else:
        from kl_patches.integrations import trl as adapter

        config_class, trainer_class, extra = adapter.GRPOConfig, adapter.GRPOTrainer, {"kl_mode": mode}
    args = config_class(**common, **extra)
    dataset = Dataset.from_dict({"prompt": list(PROMPTS) * (BATCH * steps // len(PROMPTS) + 8)})
    torch.manual_seed(seed)
    trainer = trainer_class(model=str(model_dir), reward_funcs=reward_a, args=args, train_dataset=dataset,
                            processing_class=tokenizer, callbacks=[Record()])
    trainer.remove_callback(PrinterCallback)  # TRL's per-log dict printing: the exact metrics are printed instead
    started = time.perf_counter()
    trainer.train()
    return trajectory, time.perf_counter() - started - measuring[0], metrics.optimum()


def run(rows: _common.Rows, quick: bool) -> None:
    import torch
    import transformers

    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    steps = 3 if quick else 100
    seeds = (0,) if quick else (0, 1, 2)
    every = 1 if quick else 4
    results = {name: [] for name in CONFIGURATIONS}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        optimum = {}
        for seed in seeds:
            model_dir = build_model_dir(folder, seed)
            for name, mode in CONFIGURATIONS.items():
                trajectory, seconds, optimum[seed] = train_once(model_dir, mode, seed, steps, folder / "out", every)
                results[name].append((trajectory, seconds))
                final = trajectory[max(trajectory)]
                print(f"[{SCRIPT}] seed {seed} {name:42s} {seconds:6.1f} s  reward {final['expected_reward']:.3f}  "
                      f"KL(pi||ref) {final['kl_to_reference']:.3f}  KL(pi||pi*) {final['kl_to_optimum']:.3f}  "
                      f"objective {final['objective']:.4f}")
    config = {"beta": BETA, "learning_rate": LEARNING_RATE, "steps": steps, "seeds": len(seeds),
              "completion_length": COMPLETION_LENGTH, "num_generations": 8, "batch": BATCH, "scale_rewards": "none",
              "model": "Llama 2 layers, hidden 32, vocab 7", "prompts": list(PROMPTS)}
    for seed, values in optimum.items():
        for metric, value in values.items():
            if metric != "kl_to_optimum":
                rows.add(what="trl_run-optimum", library="trl", configuration="pi*", metric=metric, unit="",
                         values=value, x_name="seed", x=seed, config=config)
    for name, runs in results.items():
        mode_config = {**config, "kl_mode": CONFIGURATIONS[name]}
        rows.add(what="trl_run-time", library="trl", configuration=name, metric="train_time", unit="s",
                 values=[seconds for _, seconds in runs], config=mode_config)
        for step in sorted(set.intersection(*(set(trajectory) for trajectory, _ in runs))):
            for metric in METRICS:
                rows.add(what="trl_run", library="trl", configuration=name, metric=metric,
                         unit="reward" if metric in ("expected_reward", "objective") else "nats",
                         values=[trajectory[step][metric] for trajectory, _ in runs], x_name="step", x=step,
                         config={"kl_mode": CONFIGURATIONS[name]})  # the settings: on the trl_run-time rows


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["what"] == "trl_run"]
    if not mine:
        return []
    optimum = {}
    for r in rows:
        if r["what"] == "trl_run-optimum":
            optimum.setdefault(r["metric"], []).append(float(r["median"]))
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.6))
    for axis, metric in zip(axes, METRICS):
        for name in dict.fromkeys(r["configuration"] for r in mine):
            line = [r for r in mine if r["configuration"] == name and r["metric"] == metric]
            xs = [int(r["x"]) for r in line]
            axis.plot(xs, [float(r["median"]) for r in line], label=name,
                      linewidth=2 if "kl-patches" in name else 1.5, linestyle="-" if "kl-patches" in name else "--")
            axis.fill_between(xs, [float(r["p20"]) for r in line], [float(r["p80"]) for r in line], alpha=0.15)
        if metric in optimum:
            axis.axhline(sum(optimum[metric]) / len(optimum[metric]), color="black", linestyle=":", linewidth=1,
                         label="pi* (mean over seeds)")
        if metric == "kl_to_optimum":
            axis.set_yscale("log")
        axis.set_title({"kl_to_reference": "sequence KL(pi || pi_ref), exact",
                        "expected_reward": "E[R], exact",
                        "objective": "E[R] - beta KL(pi || pi_ref)",
                        "kl_to_optimum": "KL(pi || pi*), pi* ∝ pi_ref exp(R/beta)"}[metric], fontsize=10)
        axis.set_xlabel("GRPOTrainer step")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    config = _common.json.loads(next(r for r in rows if r["what"] == "trl_run-time")["config"])
    version = _common.json.loads(mine[0]["versions"]).get("trl", "")
    fig.suptitle(f"trl {version} GRPOTrainer.train() on CPU, beta={config['beta']}, {config['seeds']} seeds "
                 f"(median, band p20-p80)", fontsize=11)
    fig.tight_layout()
    path = out / "trl_run.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path]


def main(argv=None) -> int:
    args = _common.parser(__doc__.split("\n")[0]).parse_args(argv)
    requested = args.libraries or ["trl"]
    coverage, _ = _common.resolve_coverage([lib for lib in requested if lib == "trl"], module="")
    for library in requested:
        if library != "trl":
            coverage.skip(library, "this benchmark trains with TRL only")
    rows = _common.Rows(SCRIPT, args.out)
    if not args.plot_only and "trl" in coverage.covered:
        try:
            from kl_patches.integrations import trl as adapter

            adapter.GRPOTrainer  # noqa: B018 - imports the adapter's trainer (and TRL) now, or fails here
            run(rows, args.quick)
        except Exception as err:  # noqa: BLE001 - reported as skipped, never silently
            coverage.skip("trl", f"{type(err).__name__}: {err}")
    _common.finish(rows, coverage, args, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
