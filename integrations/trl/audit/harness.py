"""Driving TRL on an enumerated batch: real ``GRPOTrainer`` / ``RLOOTrainer`` objects on a tiny causal LM whose
vocabulary is the audit vocabulary, fed enumerated responses in place of generation. Reused by ``kl-patches
check``, the tests and the benchmarks.

Two drivers:

* :func:`step_fn` -- **the step**: for one enumerated generation batch it runs ``GRPOTrainer.training_step`` as
  ``Trainer`` does, ``steps_per_generation x num_iterations`` times: TRL's own ``_prepare_inputs`` generates (the
  feeder answers ``_generate_single_turn``), scores, shuffles (``shuffle_sequence_dict``), splits into
  ``steps_per_generation`` micro-batches, reuses them ``num_iterations`` times; each ``training_step`` computes the
  loss with TRL's normaliser and calls backward. The accumulated ``.grad`` (no optimiser step: theta stays fixed)
  is the step's gradient, for :func:`kl_patches.audit.expected_step_gradient`.
* :func:`per_group_loss_fn` -- the loss: ``compute_loss`` on each enumerated group as a micro-batch of its own.

Sampling emulation (``Sampling``): on-policy, the rows are drawn from the policy. ``stale``: drawn from a
perturbed policy mu that also stands in for the model while TRL scores the batch, so TRL's ``old_per_token_logps``
are mu's (a later iteration of ``num_iterations``, or generation ahead of optimisation). ``vllm``: TRL runs its
vLLM branch (``use_vllm`` and ``vllm_importance_sampling_correction`` set on the trainer, generation answered by
the feeder with per-token sampling log-probs); ``mismatch`` draws the rows from a perturbed policy whose
log-probs are the ones vLLM reports (sampler != trainer), else the sampler is the policy itself.

Numerical stand-in, stated on every record: TRL 1.16 computes log-probs with a fused LM-head kernel in float32;
the audit model's fused forward returns the same fields in float64, so exactness is judged at float64 rounding.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from kl_patches.audit import AuditProblem, AuditRecord, EnumerablePolicy, PolicySpec, enumerate_responses
from kl_patches.audit.cells import GROUP_SIZE
from kl_patches.audit.engine import AuditBatch, exact_kl_gradient
from kl_patches.audit.records import BIASED, EXACT, NOT_COVERED, audit_record
from kl_patches.modes import ENV_VAR, K1_IN_REWARD, K1_RTG_LOSS, LIBRARY, mode_from_env, validate_mode
from kl_patches.patching import require_version

from kl_patches.integrations.trl import kl

Tensor = torch.Tensor

LIBRARY_NAME = "trl"
PROMPT = "t0"  # the fixed prompt: one token of the audit vocabulary
AUDIT_BETA = 0.04  # any beta > 0 (TRL's default beta=0 has no KL at all); the scale is declared per record

FLOAT64_NOTE = ("TRL's fused LM head computes log-probs in float32; the audit model's fused forward returns "
                "the same fields in float64 so exactness is judged at float64 rounding")
MODEL_NOTE = "spec.kind is not used: the policy is TRL's model, a tiny GPT-2 built from a config"
NUM_ITEMS_NOTE = ("num_items_in_batch fixed per group at group_size x mean enumerated length (its large-batch "
                  "value; with a 2-response batch it would make the dapo normaliser a ratio)")
ZERO_REWARD_NOTE = "task reward 0: the gradient audited is the KL part alone"



# --------------------------------------------------------------------------------------------------------------
# The tiny model and tokenizer
# --------------------------------------------------------------------------------------------------------------

def vocabulary(vocab: int) -> dict[str, int]:
    """Token strings of the audit vocabulary: t0 .. t{vocab-2}, then EOS '</s>' = vocab - 1."""
    words = {f"t{i}": i for i in range(vocab - 1)}
    words["</s>"] = vocab - 1
    return words


def build_tokenizer(vocab: int):
    """A WordLevel tokenizer over exactly the audit vocabulary (no download); EOS doubles as pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=vocabulary(vocab), unk_token="</s>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>", unk_token="</s>")


def build_model(vocab: int, horizon: int, seed: int = 0, *, hidden: int = 16, dtype=torch.float64):
    """A one-layer ``GPT2LMHeadModel`` over the audit vocabulary, from a config in code. GPT-2 keeps float64
    end to end (Llama-style RMSNorm upcasts to float32, whose rounding would blur the float64 exactness check).
    Weights are drawn with std 0.5 so the policy is far from uniform."""
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = vocab - 1
    config = GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=1, n_head=2, n_inner=2 * hidden, n_positions=max(32, horizon + 8),
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, initializer_range=0.5, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).to(dtype)


def save_tiny(spec: PolicySpec, directory: str) -> str:
    """Write the tiny model and tokenizer of ``spec`` where TRL can load them as a local model path."""
    model = build_model(spec.vocab, spec.horizon, spec.seed)
    model.save_pretrained(directory)
    build_tokenizer(spec.vocab).save_pretrained(directory)
    return directory


def use_float64_log_probs(model, temperature: float = 1.0) -> None:
    """Replace TRL's fused-LM-head forward (float32 kernel) by the same contract computed in float64: with
    ``fused_lm_head=True`` it returns per-token ``log_probs`` and ``entropy`` of the shifted labels (0 where the
    label is -100); without it, the model's own forward."""
    base_forward = type(model).forward

    def forward(self, *args, fused_lm_head: bool = False, labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return base_forward(self, *args, labels=labels, **kwargs)
        kwargs["use_cache"] = False
        kwargs.pop("output_router_logits", None)
        logits = base_forward(self, *args, **kwargs).logits[:, :-1].to(torch.float64) / temperature
        targets = labels[:, 1:]
        valid = targets != -100
        log_probs = torch.log_softmax(logits, dim=-1)
        chosen = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        zero = torch.zeros((), dtype=torch.float64)
        return types.SimpleNamespace(log_probs=torch.where(valid, chosen, zero),
                                     entropy=torch.where(valid, entropy, zero), aux_loss=None, label_mask=valid)

    model.forward = types.MethodType(forward, model)


class HFPolicy(EnumerablePolicy):
    """A Hugging Face causal LM with a fixed prompt as an enumerable policy: log pi(y_t | prompt, y_<t)."""

    def __init__(self, model, prompt_ids: Sequence[int], vocab: int, horizon: int, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.prompt_ids = list(prompt_ids)
        self.vocab_size, self.eos_id, self.horizon = vocab, vocab - 1, horizon
        self.temperature = temperature

    def token_logprobs(self, tokens: Tensor, mask: Tensor) -> Tensor:
        rows, prompt_length = tokens.shape[0], len(self.prompt_ids)
        prompt = torch.tensor(self.prompt_ids, dtype=torch.long).expand(rows, -1)
        input_ids = torch.cat([prompt, torch.where(mask, tokens, torch.full_like(tokens, self.eos_id))], dim=1)
        attention_mask = torch.cat([torch.ones_like(prompt), mask.long()], dim=1)
        logits = type(self.model).forward(self.model, input_ids=input_ids, attention_mask=attention_mask,
                                          use_cache=False).logits
        logits = logits[:, prompt_length - 1:-1].to(torch.float64) / self.temperature
        chosen = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return torch.where(mask, chosen, torch.zeros((), dtype=chosen.dtype))

    @torch.no_grad()
    def perturbed(self, scale: float, seed: int) -> "HFPolicy":
        clone = super().perturbed(scale, seed)
        use_float64_log_probs(clone.model, self.temperature)  # bind the fused forward to the copy itself
        return clone


# --------------------------------------------------------------------------------------------------------------
# Feeding the enumerated responses to TRL
# --------------------------------------------------------------------------------------------------------------

def response_key(ids: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(i) for i in ids)


class ResponseFeeder:
    """Stands in for generation on one trainer: ``_generate_single_turn`` returns the responses of ``rows`` (and,
    when ``sampler`` is set, their per-token log-probs under it, as vLLM reports them).

    ``table=True`` (the loss driver): ``_get_per_token_logps_and_entropies`` runs TRL's own method once per model on
    the distinct responses and serves each batch its rows (so 225 groups cost one forward, with one graph).
    ``table=False`` (the step driver): TRL's own method runs on the very batch it is given, every time.

    ``stale``: while TRL scores a batch (``phase == "score"``) the problem's behaviour model stands in for
    ``trainer.model``, so TRL's ``old_per_token_logps`` are the behaviour policy's, as after a stale update."""

    def __init__(self, trainer, problem: AuditProblem, *, stale: bool | None = None,
                 sampler: EnumerablePolicy | None = None, table: bool = True):
        self.trainer = trainer
        self.problem = problem
        self.stale = problem.behaviour is not None if stale is None else stale
        self.sampler = sampler
        self.table = table
        self.phase = "loss"
        self.rows = torch.zeros(0, dtype=torch.long)
        self.cache: dict = {}
        self.set_table(problem.tokens, problem.mask)

    def set_table(self, tokens: Tensor, mask: Tensor) -> None:
        self.tokens, self.mask = tokens, mask
        self.responses = [row[m].tolist() for row, m in zip(tokens, mask)]
        self.index = {response_key(r): i for i, r in enumerate(self.responses)}
        self.cache = {}
        self.sampler_logps = None

    # -- generation ------------------------------------------------------------------------------------------

    def generate_single_turn(self, prompt_ids, *args, **kwargs):
        if len(prompt_ids) != len(self.rows):
            raise RuntimeError(
                f"the trainer asked for {len(prompt_ids)} completions, the feeder holds {len(self.rows)}")
        completions = [list(self.responses[int(r)]) for r in self.rows]
        rloo = sys.modules.get("trl.trainer.rloo_trainer")  # not imported here: only RLOO cells need it
        if rloo is not None and isinstance(self.trainer, rloo.RLOOTrainer):  # RLOO's returns the ids only; GRPO's (ids, sampling logprobs)
            return completions
        if self.sampler is None:
            return completions, None
        if self.sampler_logps is None:
            with torch.no_grad():
                self.sampler_logps = self.sampler.token_logprobs(self.tokens, self.mask)
        logprobs = [self.sampler_logps[int(r), :len(self.responses[int(r)])].tolist() for r in self.rows]
        return completions, logprobs

    # -- log-probs --------------------------------------------------------------------------------------------

    def source(self, model):
        if model is self.trainer.ref_model:
            return "reference", self.problem.reference.model
        if self.phase == "score" and self.stale:
            return "behaviour", self.problem.behaviour.model
        return "policy", model

    def table_logps(self, name: str, model) -> tuple[Tensor, Tensor]:
        key = (name, torch.is_grad_enabled())
        if key not in self.cache:
            prompt_ids = torch.tensor(self.problem.policy.prompt_ids, dtype=torch.long)
            rows = self.tokens.shape[0]
            eos = self.problem.policy.eos_id
            completion = torch.where(self.mask, self.tokens, torch.full_like(self.tokens, eos))
            input_ids = torch.cat([prompt_ids.expand(rows, -1), completion], dim=1)
            attention_mask = torch.cat([torch.ones(rows, len(prompt_ids), dtype=torch.long), self.mask.long()], dim=1)
            original = type(self.trainer)._get_per_token_logps_and_entropies
            logps, entropies, _ = original(self.trainer, model, input_ids, attention_mask, self.tokens.shape[1],
                                           compute_entropy=True)
            self.cache[key] = (logps, entropies)
        return self.cache[key]

    def get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                          compute_entropy=False, compute_aux_loss=False, **kwargs):
        name, source_model = self.source(model)
        if not self.table:
            original = type(self.trainer)._get_per_token_logps_and_entropies
            return original(self.trainer, source_model, input_ids, attention_mask, logits_to_keep,
                            batch_size=batch_size, compute_entropy=compute_entropy,
                            compute_aux_loss=compute_aux_loss, **kwargs)
        logps, entropies = self.table_logps(name, source_model)
        completion = input_ids[:, -logits_to_keep:]
        valid = attention_mask[:, -logits_to_keep:].bool()
        # A row whose completion mask is all zero (mask_truncated_completions) is never read unmasked by TRL:
        # it gets zeros. Every other row must be one of the table's responses.
        keys = [response_key(c[v]) for c, v in zip(completion, valid)]
        missing = [key for key in keys if key and key not in self.index]
        if missing:
            raise RuntimeError(f"response {missing[0]} is not in the feeder's table")
        rows = torch.tensor([self.index.get(key, 0) for key in keys])
        empty = torch.tensor([not key for key in keys])[:, None]
        width = min(logits_to_keep, logps.shape[1])
        pad = logits_to_keep - width

        def take(values: Tensor) -> Tensor:
            taken = torch.nn.functional.pad(values[rows, :width], (0, pad))
            return torch.where(empty, torch.zeros((), dtype=taken.dtype), taken)

        return take(logps), take(entropies) if compute_entropy else None, None

    @contextlib.contextmanager
    def installed(self) -> Iterator["ResponseFeeder"]:
        names = ("_generate_single_turn", "_get_per_token_logps_and_entropies", "_generate_and_score_completions")
        trainer = self.trainer
        self.trainer._generate_single_turn = self.generate_single_turn
        self.trainer._get_per_token_logps_and_entropies = self.get_per_token_logps_and_entropies

        def scoring_phase(batch):  # TRL's _prepare_inputs scores through the (patched or subclassed) method
            with self.scoring():
                return type(trainer)._generate_and_score_completions(trainer, batch)

        self.trainer._generate_and_score_completions = scoring_phase
        try:
            yield self
        finally:
            for name in names:
                self.trainer.__dict__.pop(name, None)

    @contextlib.contextmanager
    def scoring(self):
        self.phase = "score"
        try:
            yield
        finally:
            self.phase = "loss"


def slice_batch(output: dict, part: slice, rows: int) -> dict:
    """Rows ``part`` of a generation batch: per-row tensors and lists are cut, batch scalars kept."""
    sliced = {}
    for key, value in output.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
            sliced[key] = value[part]
        elif isinstance(value, list) and len(value) == rows:
            sliced[key] = value[part]
        else:
            sliced[key] = value
    return sliced


# --------------------------------------------------------------------------------------------------------------
# Building a tiny trainer
# --------------------------------------------------------------------------------------------------------------

def zero_reward(completions, **kwargs) -> list[float]:
    """The audit's task reward: zero, so the advantages carry only the KL (TRL scales 0 by its std to 0)."""
    return [0.0] * len(completions)


def base_config(spec: PolicySpec, output_dir: str) -> dict[str, Any]:
    """Settings every audit trainer shares: one group per micro-batch, CPU float64, no logging or saving."""
    return dict(
        output_dir=output_dir, per_device_train_batch_size=GROUP_SIZE, num_generations=GROUP_SIZE,
        max_completion_length=spec.horizon, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        report_to=[], logging_steps=1, save_strategy="no", disable_dropout=True, seed=spec.seed,
        model_init_kwargs={"dtype": torch.float64}, temperature=1.0,
    )


@dataclass
class TinyTRL:
    """A real TRL trainer on the tiny model of ``spec``, with its audit problem and response feeder."""

    trainer: Any
    problem: AuditProblem
    feeder: ResponseFeeder
    directory: str


_TINY_MODELS: dict[PolicySpec, str] = {}


def tiny_model_path(spec: PolicySpec) -> str:
    """A folder holding the tiny model of ``spec`` (written once per process)."""
    key = dataclasses.replace(spec, distance=1.0, staleness=0.0)  # the weights depend on vocab, horizon, seed only
    path = _TINY_MODELS.get(key)
    if path is None or not os.path.isdir(path):
        path = save_tiny(spec, tempfile.mkdtemp(prefix="kl-patches-trl-"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)  # a few kB, gone when the process ends
        _TINY_MODELS[key] = path
    return path


def make_config(trainer: str = "grpo", *, kl_mode: str | None = None, **settings):
    """TRL's own config class (``grpo``/``rloo``), or kl-patches' GRPOConfig when ``kl_mode`` is given."""
    import trl

    if trainer == "rloo":
        return trl.RLOOConfig(**settings)
    if trainer != "grpo":
        raise ValueError(f"unknown trainer {trainer!r}; choose 'grpo' or 'rloo'")
    if kl_mode is None:
        return trl.GRPOConfig(**settings)
    from kl_patches.integrations.trl.trainer import GRPOConfig

    return GRPOConfig(kl_mode=kl_mode, **settings)


def build_tiny_trainer(spec: PolicySpec, *, off_policy: bool = False, trainer: str = "grpo",
                       kl_mode: str | None = None, config=None, reward_funcs=None, trainer_class=None,
                       vllm: str | None = None, vllm_correction: bool = True, table: bool = True,
                       **settings) -> TinyTRL:
    """A real ``GRPOTrainer`` (kl-patches' subclass when ``kl_mode`` is given, or when ``config`` is a kl-patches
    GRPOConfig) or ``RLOOTrainer`` on the tiny model of ``spec``, in training mode, with the audit's reference
    (and behaviour, ``off_policy``) policies in place. ``settings`` override :func:`base_config` (e.g.
    ``beta=0.04, loss_type="grpo", num_iterations=2``); ``config`` is used as is instead. ``trainer_class``
    overrides the class (e.g. a GRPOTrainer subclass); ``reward_funcs`` the zero task reward.

    ``off_policy``: rows sampled from a stale policy mu that also scores the batch (TRL's old log-probs are mu's).
    ``vllm`` = ``"match"`` / ``"mismatch"``: TRL's vLLM branch, the feeder reporting per-token sampling log-probs of
    the policy itself / of a perturbed sampler that draws the rows (``vllm_correction`` sets TRL's
    ``vllm_importance_sampling_correction``). ``table=False`` for the step driver (real forwards every call)."""
    import trl
    from datasets import Dataset

    directory = tiny_model_path(spec)
    if config is None:
        merged = {**base_config(spec, os.path.join(directory, "out")), **settings}
        config = make_config(trainer, kl_mode=kl_mode, **merged)
    if trainer_class is not None:
        trainer_cls = trainer_class
    elif trainer == "rloo":
        trainer_cls = trl.RLOOTrainer
    elif hasattr(config, "kl_mode"):
        from kl_patches.integrations.trl.trainer import GRPOTrainer

        trainer_cls = GRPOTrainer
    else:
        trainer_cls = trl.GRPOTrainer
    tokenizer = build_tokenizer(spec.vocab)
    dataset = Dataset.from_dict({"prompt": [PROMPT] * max(8, getattr(config, "generation_batch_size", None) or 8)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        instance = trainer_cls(model=directory, reward_funcs=reward_funcs or zero_reward, args=config,
                               train_dataset=dataset, processing_class=tokenizer)
    instance.model.train()  # TRL's "train" branch: grouping by num_generations, accumulation scaling
    instance.current_gradient_accumulation_steps = config.gradient_accumulation_steps  # set by Trainer.train()

    temperature = float(getattr(instance, "temperature", 1.0))
    use_float64_log_probs(instance.model, temperature)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    policy = HFPolicy(instance.model, prompt_ids, spec.vocab, spec.horizon, temperature)
    # As the core's build_problem: pi_ref = pi + distance * noise, mu = pi + staleness * noise.
    reference = policy.perturbed(spec.distance, seed=spec.seed + 1_000)
    if vllm not in (None, "match", "mismatch"):
        raise ValueError(f"vllm must be None, 'match' or 'mismatch', got {vllm!r}")
    sampled_off = off_policy or vllm == "mismatch"
    behaviour = policy.perturbed(spec.staleness, seed=spec.seed + 2_000) if sampled_off else None
    if instance.ref_model is not None:
        instance.ref_model = reference.model
    if vllm is not None:
        # TRL's vLLM branch without a vLLM engine: the flags TRL reads on the trainer, generation from the feeder.
        instance.use_vllm = True
        instance.vllm_importance_sampling_correction = vllm_correction
    tokens, mask = enumerate_responses(spec.vocab, spec.horizon, eos_id=spec.eos_id)
    problem = AuditProblem(spec, policy, reference, behaviour, tokens, mask)
    sampler = None if vllm is None else (behaviour if vllm == "mismatch" else policy)
    feeder = ResponseFeeder(instance, problem, stale=off_policy, sampler=sampler, table=table)
    return TinyTRL(instance, problem, feeder, directory)


def fixed_num_items(problem: AuditProblem, group_size: int = GROUP_SIZE) -> float:
    return group_size * float(problem.mask.sum(-1).double().mean())


def trl_group_losses(tiny: TinyTRL, rows: Tensor, group_size: int, num_items: float | None = None) -> Tensor:
    """TRL's loss for each group of ``group_size`` consecutive ``rows`` (indices into the feeder's table): one
    call of the trainer's ``_generate_and_score_completions`` for all of them (one generation batch), then one
    ``compute_loss`` per group (one micro-batch each)."""
    trainer, feeder = tiny.trainer, tiny.feeder
    if rows.numel() % group_size:
        raise ValueError(f"{rows.numel()} rows do not form groups of {group_size}")
    feeder.cache = {key: value for key, value in feeder.cache.items() if key[0] != "policy"}
    feeder.rows = rows
    groups = rows.numel() // group_size
    with feeder.installed():
        with feeder.scoring():
            output = trainer._generate_and_score_completions([{"prompt": PROMPT}] * rows.numel())
        losses = []
        for g in range(groups):
            inputs = slice_batch(output, slice(g * group_size, (g + 1) * group_size), rows.numel())
            if num_items is not None and "num_items_in_batch" in inputs:
                inputs["num_items_in_batch"] = torch.tensor(num_items, dtype=torch.float64)
            losses.append(trainer.compute_loss(trainer.model, inputs).reshape(()))
    for metrics in trainer._metrics.values():
        metrics.clear()
    return torch.stack(losses)


def trl_loss(tiny: TinyTRL, tokens: Tensor, mask: Tensor, *, group_size: int = GROUP_SIZE,
             num_items: float | None = None) -> Tensor:
    """TRL's training loss (a scalar with its autograd graph) for one batch of given responses (right-padded
    ``tokens`` with a boolean ``mask``; rows grouped ``group_size`` at a time): scoring, then ``compute_loss`` on
    the whole batch as one micro-batch."""
    if tokens.shape != mask.shape or mask.dtype != torch.bool:
        raise ValueError("tokens and mask must have the same shape and mask must be boolean")
    responses = [response_key(row[m].tolist()) for row, m in zip(tokens, mask)]
    if any(len(r) == 0 for r in responses):
        raise ValueError("empty responses cannot be fed to TRL (every completion has at least one token)")
    distinct = list(dict.fromkeys(responses))
    table = torch.full((len(distinct), tokens.shape[1]), tiny.problem.policy.eos_id, dtype=torch.long)
    table_mask = torch.zeros_like(table, dtype=torch.bool)
    for i, response in enumerate(distinct):
        table[i, :len(response)] = torch.tensor(response)
        table_mask[i, :len(response)] = True
    tiny.feeder.set_table(table, table_mask)
    rows = torch.tensor([distinct.index(r) for r in responses])
    try:
        return trl_group_losses(tiny, rows, group_size=rows.numel(), num_items=num_items).reshape(())
    finally:
        tiny.feeder.set_table(tiny.problem.tokens, tiny.problem.mask)


def per_group_loss_fn(tiny: TinyTRL, num_items: float) -> Callable[[AuditBatch], Tensor]:
    """The audit engine's loss: the (G,) losses TRL gives each enumerated group as a micro-batch of its own."""

    def loss(batch: AuditBatch) -> Tensor:
        return trl_group_losses(tiny, batch.rows, batch.group_size, num_items)

    return loss




# --------------------------------------------------------------------------------------------------------------
# The step driver
# --------------------------------------------------------------------------------------------------------------

def step_calls(trainer) -> int:
    """``training_step`` calls that consume one generation batch: steps_per_generation x num_iterations."""
    return trainer.args.steps_per_generation * trainer.num_iterations


def optimisation_steps(trainer) -> float:
    """Optimisation steps one generation batch feeds (each accumulates gradient_accumulation_steps calls)."""
    return step_calls(trainer) / trainer.args.gradient_accumulation_steps


def generation_rows(trainer) -> int:
    """Rows of one generation batch on this (single) process: per_device_train_batch_size x steps_per_generation."""
    return trainer.args.per_device_train_batch_size * trainer.args.steps_per_generation


def run_step(tiny: TinyTRL, rows: Tensor) -> Tensor:
    """One generation batch (enumerated ``rows``) through GRPOTrainer's real training path, as ``Trainer`` drives
    it: ``training_step`` (TRL's ``_prepare_inputs``: generate, score, shuffle, split, buffer; ``compute_loss``;
    Trainer's accumulation scaling; backward) ``steps_per_generation x num_iterations`` times, theta fixed.
    Returns the accumulated flat gradient of the policy's parameters (read and zeroed)."""
    from kl_patches.audit.engine import accumulated_grad

    trainer, feeder = tiny.trainer, tiny.feeder
    if rows.numel() != generation_rows(trainer):
        raise ValueError(f"a generation batch of this trainer has {generation_rows(trainer)} rows, got {rows.numel()}")
    parameters = tiny.problem.parameters()
    for p in parameters:
        p.grad = None
    feeder.rows = rows
    feeder.sampler_logps = None
    trainer._step = 0
    trainer._buffered_inputs = None
    prompts = [{"prompt": PROMPT}] * rows.numel()
    with feeder.installed():
        for _ in range(step_calls(trainer)):
            trainer.training_step(trainer.model, prompts, None)
    for metrics in trainer._metrics.values():
        metrics.clear()
    return accumulated_grad(parameters)


def step_fn(tiny: TinyTRL) -> Callable[[AuditBatch], Tensor]:
    """The step audit's ``step_fn``: the gradient TRL's real step accumulates on one enumerated generation batch."""

    def step(batch: AuditBatch) -> Tensor:
        return run_step(tiny, batch.rows)

    return step


def step_num_groups(trainer) -> int:
    rows = generation_rows(trainer)
    if rows % trainer.num_generations:
        raise ValueError(f"a generation batch of {rows} rows does not hold whole groups of {trainer.num_generations}")
    return rows // trainer.num_generations
