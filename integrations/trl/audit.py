"""The exact audit of TRL's own KL code: real ``GRPOTrainer`` / ``RLOOTrainer`` objects on a tiny causal LM whose
vocabulary is the audit vocabulary, fed every enumerated response in place of generation.

How one cell runs (:func:`audit_cell`):

1. A tiny ``GPT2LMHeadModel`` is built from a config in code (vocabulary = ``spec.vocab`` tokens, EOS =
   vocab - 1, also the pad token) and saved with a local WordLevel tokenizer; TRL loads policy and reference from
   that folder as it would any model. The reference and (off-policy) the behaviour policy are perturbed copies.
2. The trainer's ``_generate_single_turn`` is replaced by one returning the enumerated responses, so TRL's own
   ``_generate`` / ``_generate_and_score_completions`` (rewards, group advantages, reference and old log-probs,
   kl-patches' scoring) run on them; every enumerated group of ``num_generations = 2`` responses forms one group of
   one generation batch, as in TRL.
3. Each group is then one micro-batch of TRL's ``compute_loss``; the engine weights the losses by the groups'
   probabilities and differentiates: E[grad loss] exactly, against grad KL_seq by autograd on the enumeration.

Two numerical stand-ins, stated on every record: TRL 1.15/1.16 compute log-probs with a fused LM-head kernel in float32,
so the audit model's fused forward returns the same fields (log-probs, entropy) in float64 (exactness is judged at
float64 rounding); and ``num_items_in_batch`` (TRL's token count of the generation batch, the ``dapo`` normaliser) is
fixed per group at group_size * the mean enumerated length, the value it approaches in a large generation batch.
The task reward is zero, so the gradient audited is the KL part alone.

Reusable pieces (e.g. for a training-loop benchmark): :func:`build_tiny_trainer` returns a :class:`TinyTRL`
(trainer, audit problem, response feeder) for a :class:`~kl_patches.audit.PolicySpec`, and :func:`trl_loss`
computes TRL's loss for a batch of given responses through the trainer's own methods.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import shutil
import tempfile
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from kl_patches.audit import AuditProblem, AuditRecord, EnumerablePolicy, PolicySpec, enumerate_responses
from kl_patches.audit.engine import AuditBatch, exact_kl_gradient
from kl_patches.audit.records import BIASED, EXACT, NOT_COVERED, audit_record
from kl_patches.modes import ENV_VAR, K1_IN_REWARD, K1_RTG_LOSS, LIBRARY, mode_from_env, validate_mode
from kl_patches.patching import require_version

from kl_patches.integrations.trl import kl

Tensor = torch.Tensor

LIBRARY_NAME = "trl"
PROMPT = "t0"  # the fixed prompt: one token of the audit vocabulary
AUDIT_BETA = 0.04  # any beta > 0 (TRL's default beta=0 has no KL at all); the scale is declared per record
GROUP_SIZE = 2  # TRL needs num_generations >= 2; groups of 2 are enumerated exactly (225 for the default spec)

FLOAT64_NOTE = ("TRL's fused LM head computes log-probs in float32; the audit model's fused forward returns "
                "the same fields in float64 so exactness is judged at float64 rounding")
MODEL_NOTE = "spec.kind is not used: the policy is TRL's model, a tiny GPT-2 built from a config"
NUM_ITEMS_NOTE = ("num_items_in_batch fixed per group at group_size x mean enumerated length (its large-batch "
                  "value; with a 2-response batch it would make the dapo normaliser a ratio)")
ZERO_REWARD_NOTE = "task reward 0: the gradient audited is the KL part alone"

FIX_ON = f"kl_mode: {K1_IN_REWARD}  (or {ENV_VAR}={K1_IN_REWARD})"
FIX_OFF = f"kl_mode: {K1_RTG_LOSS}  (or {ENV_VAR}={K1_RTG_LOSS})"


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
    """Stands in for generation on one trainer: ``_generate_single_turn`` returns the responses of ``rows``; the
    trainer's ``_get_per_token_logps_and_entropies`` runs TRL's own method once per model on the distinct
    responses and serves each batch its rows (so 225 groups cost one forward, with one autograd graph).

    During scoring (``phase == "score"``) an off-policy problem's behaviour model stands in for ``trainer.model``,
    so TRL's ``old_per_token_logps`` are the behaviour policy's, as after a stale update."""

    def __init__(self, trainer, problem: AuditProblem):
        self.trainer = trainer
        self.problem = problem
        self.phase = "loss"
        self.rows = torch.zeros(0, dtype=torch.long)
        self.cache: dict = {}
        self.set_table(problem.tokens, problem.mask)

    def set_table(self, tokens: Tensor, mask: Tensor) -> None:
        self.tokens, self.mask = tokens, mask
        self.responses = [row[m].tolist() for row, m in zip(tokens, mask)]
        self.index = {response_key(r): i for i, r in enumerate(self.responses)}
        self.cache = {}

    # -- generation ------------------------------------------------------------------------------------------

    def generate_single_turn(self, prompt_ids, *args, **kwargs):
        if len(prompt_ids) != len(self.rows):
            raise RuntimeError(
                f"the trainer asked for {len(prompt_ids)} completions, the feeder holds {len(self.rows)}")
        completions = [list(self.responses[int(r)]) for r in self.rows]
        from trl import RLOOTrainer

        if isinstance(self.trainer, RLOOTrainer):  # RLOO's returns the ids only; GRPO's (ids, sampling logprobs)
            return completions
        return completions, None

    # -- log-probs --------------------------------------------------------------------------------------------

    def source(self, model):
        if model is self.trainer.ref_model:
            return "reference", self.problem.reference.model
        if self.phase == "score" and self.problem.behaviour is not None:
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
        names = ("_generate_single_turn", "_get_per_token_logps_and_entropies")
        self.trainer._generate_single_turn = self.generate_single_turn
        self.trainer._get_per_token_logps_and_entropies = self.get_per_token_logps_and_entropies
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
                       **settings) -> TinyTRL:
    """A real ``GRPOTrainer`` (kl-patches' subclass when ``kl_mode`` is given, or when ``config`` is a kl-patches
    GRPOConfig) or ``RLOOTrainer`` on the tiny model of ``spec``, in training mode, with the audit's reference
    (and behaviour, ``off_policy``) policies in place. ``settings`` override :func:`base_config` (e.g.
    ``beta=0.04, loss_type="grpo", num_iterations=2``); ``config`` is used as is instead. ``trainer_class``
    overrides the class (e.g. a GRPOTrainer subclass); ``reward_funcs`` the zero task reward."""
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
    behaviour = policy.perturbed(spec.staleness, seed=spec.seed + 2_000) if off_policy else None
    if instance.ref_model is not None:
        instance.ref_model = reference.model
    tokens, mask = enumerate_responses(spec.vocab, spec.horizon, eos_id=spec.eos_id)
    problem = AuditProblem(spec, policy, reference, behaviour, tokens, mask)
    return TinyTRL(instance, problem, ResponseFeeder(instance, problem), directory)


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
# What each configuration's gradient is
# --------------------------------------------------------------------------------------------------------------

def nominal_scale(config, trainer: str, num_items: float, group_size: int = GROUP_SIZE) -> float:
    """The constant the configuration multiplies grad KL_seq by (beta over its batch-constant normaliser)."""
    beta = float(config.beta)
    if trainer == "rloo":
        return beta  # sequence mean
    if config.loss_type == "dr_grpo":
        return beta / config.max_completion_length
    if config.loss_type == "luspo":
        return beta
    return beta * group_size / num_items  # token-mean losses: the (fixed) token count


def aggregation_words(loss_type: str) -> str:
    if loss_type in ("grpo", "sapo"):
        return "seq-mean-token-mean (1/|y_i| per response: length-weighted)"
    if loss_type == "bnpo":
        return "token mean over the micro-batch (a sample-dependent normaliser)"
    return {"dr_grpo": "sum / (B x max_completion_length)", "luspo": "token sum, sequence mean"}.get(
        loss_type, "global token mean")


def library_description(config, trainer: str, on_policy: bool) -> tuple[str, str, str]:
    """(estimator, placement, reason) of an unpatched TRL configuration, in the shared doc's terms."""
    if trainer == "rloo":
        reason = ("k1 summed over the response in the reward with RLOO's leave-one-out baseline: the score-function "
                  "gradient of KL_seq" if on_policy else
                  "the KL reward uses the old log-probs and the sequence ratio pi/mu reweights only the score: "
                  "biased off-policy")
        return "k1", "reward", reason
    aggregation = aggregation_words(config.loss_type)
    if config.use_bias_correction_kl and config.importance_sampling_level == "sequence":
        estimator = "k3 x sequence ratio"
        reason = ("k3 times the sequence-level ratio exp(mean_t log-ratio) (use_bias_correction_kl with "
                  "importance_sampling_level=sequence): a spurious (sum_t k3_t/|y|) x sum_t g_t term on top of "
                  "the k3 gradient (TRL issue 6586)")
    elif config.use_bias_correction_kl:
        estimator = "k3 x token ratio"
        reason = ("k3 times the differentiable token ratio (use_bias_correction_kl): on-policy E[sum_t l_t g_t], the "
                  "own-token term only, missing the future-token KL" if on_policy else
                  "k3 times the token ratio: token ratios correct the action at the visited prefix, not the prefix "
                  "distribution, and the future-token KL is still missing")
    else:
        estimator = "k3"
        reason = ("k3 in the loss: E[sum_t (1 - e^{-l_t}) g_t], the per-position forward-KL gradient"
                  + ("" if on_policy else "; nothing reweights the off-policy samples"))
    return estimator, "loss", f"{reason}; aggregated by loss_type={config.loss_type}: {aggregation}"


def mode_description(mode: str, on_policy: bool, loss_type: str) -> tuple[str, str, str, str | None]:
    """(estimator, placement, reason, fix) of a kl-patches mode inside GRPOTrainer."""
    normaliser = ("TRL's own batch constant" if loss_type in ("dr_grpo", "luspo") else
                  "the generation batch's token count (a batch constant, also replacing "
                  f"loss_type={loss_type}'s own normaliser)" if loss_type not in kl.TOKEN_MEAN_LOSSES else
                  "the generation batch's token count (a batch constant)")
    if mode == K1_IN_REWARD:
        if on_policy:
            return ("k1", "reward", "sequence k1 at the sampling log-probs minus a leave-one-out group baseline, "
                    f"added to TRL's advantages after reward scaling, normalised by {normaliser}: exact", None)
        return ("k1", "reward", "TRL's token-level PPO ratio corrects each action but not the prefix distribution: "
                f"k1-in-reward is exact on-policy only; off-policy use {K1_RTG_LOSS}", FIX_OFF)
    if on_policy:
        return ("k1", "loss", "reward-to-go score-function surrogate with a leave-one-out group baseline, "
                f"normalised by {normaliser}; TRL's k3 term removed: exact", None)
    return ("k1", "loss", "per-decision prefix weights rho_{1:t} = prod pi/mu from old_per_token_logps make the "
            f"reward-to-go surrogate exact under the behaviour policy; normalised by {normaliser}", None)


@dataclass(frozen=True)
class Cell:
    """One audited configuration: a name, the trainer, its settings, the mode and the regimes."""

    configuration: str
    trainer: str = "grpo"
    settings: dict = field(default_factory=dict)
    mode: str = LIBRARY
    regimes: tuple[str, ...] = ("on", "off")


def default_cells() -> list[Cell]:
    beta = {"beta": AUDIT_BETA}
    cells = [
        Cell(f"GRPO defaults, beta={AUDIT_BETA} (loss_type=dapo, use_bias_correction_kl=True)", settings=beta),
        Cell("GRPO use_bias_correction_kl=False", settings={**beta, "use_bias_correction_kl": False}),
        Cell("GRPO importance_sampling_level=sequence", settings={**beta, "importance_sampling_level": "sequence"}),
    ]
    for loss_type in ("grpo", "bnpo", "dr_grpo", "luspo", "sapo", "cispo", "vespo"):
        cells.append(Cell(f"GRPO loss_type={loss_type}", settings={**beta, "loss_type": loss_type}, regimes=("on",)))
    cells.append(Cell("RLOO defaults (beta=0.05, k1 in reward)", trainer="rloo"))
    for mode in (K1_IN_REWARD, K1_RTG_LOSS):
        cells.append(Cell(f"GRPO kl_mode={mode}", settings=beta, mode=mode))
        for loss_type in ("grpo", "bnpo", "dr_grpo", "luspo"):
            cells.append(Cell(f"GRPO kl_mode={mode}, loss_type={loss_type}",
                              settings={**beta, "loss_type": loss_type}, mode=mode, regimes=("on",)))
    return cells


def off_policy_settings(settings: dict) -> dict:
    """Off-policy through TRL's own mechanism: num_iterations=2 makes TRL keep old_per_token_logps (the behaviour
    policy's, in the audit) and use them in its ratios."""
    return {**settings, "num_iterations": 2}


def audit_cell(spec: PolicySpec, cell: Cell, regime: str, *, truth_cache: dict | None = None, config=None,
               user_config: bool = False, extra_notes: Sequence[str] = (), off_policy_config: bool = False
               ) -> AuditRecord:
    """Audit one configuration in one regime through the real trainer. ``off_policy_config``: the configuration
    trains off-policy, so its fix is the off-policy-exact mode even for the on-policy record."""
    on_policy = regime == "on"
    settings = cell.settings if on_policy else off_policy_settings(cell.settings)
    kl_mode = None if cell.mode == LIBRARY else cell.mode
    tiny = build_tiny_trainer(spec, off_policy=not on_policy, trainer=cell.trainer, kl_mode=kl_mode,
                              config=config, **({} if config is not None else settings))
    args = tiny.trainer.args
    num_items = fixed_num_items(tiny.problem)
    truth = None
    if truth_cache is not None:
        truth = truth_cache.get(regime)
    if truth is None:
        truth = exact_kl_gradient(tiny.problem)
        if truth_cache is not None:
            truth_cache[regime] = truth
    if cell.mode == LIBRARY:
        estimator, placement, reason = library_description(args, cell.trainer, on_policy)
        fix = FIX_ON if on_policy and not off_policy_config else FIX_OFF
        if cell.trainer == "rloo" and not on_policy:
            fix = f"GRPOTrainer with {FIX_OFF}"
    else:
        estimator, placement, reason, fix = mode_description(cell.mode, on_policy, args.loss_type)
    record = audit_record(
        tiny.problem, per_group_loss_fn(tiny, num_items), library=LIBRARY_NAME, library_version=kl.trl_version(),
        configuration=cell.configuration, estimator=estimator, placement=placement, reason=reason, mode=cell.mode,
        group_size=GROUP_SIZE, scale=nominal_scale(args, cell.trainer, num_items), fix=fix,
        notes=[FLOAT64_NOTE, NUM_ITEMS_NOTE, ZERO_REWARD_NOTE, MODEL_NOTE, *extra_notes], user_config=user_config,
        truth=truth, trainer=type(tiny.trainer).__name__, model="GPT2LMHeadModel (1 layer, hidden 16, float64)",
        settings={k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                  for k, v in settings.items()},
        num_items_in_batch=num_items,
    )
    return record


def not_covered_records() -> list[AuditRecord]:
    """Trainers that override ``_compute_loss`` with their own KL code: kl-patches' GRPO patch does not reach them
    (and raises rather than train on them in a patched mode)."""
    import importlib

    import trl

    records = []
    candidates = [("trl.experimental.gmpo", "GMPOTrainer")]
    seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name, class_name in candidates:
            try:
                cls = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError):
                continue
            seen.add(cls)
    seen.update(cls for cls in all_subclasses(trl.GRPOTrainer) if not getattr(cls, kl.OWNER_FLAG, False))
    for cls in sorted(seen, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        if "_compute_loss" not in vars(cls) or not issubclass(cls, trl.GRPOTrainer):
            continue
        records.append(AuditRecord(
            library=LIBRARY_NAME, library_version=kl.trl_version(),
            configuration=f"{cls.__module__}.{cls.__qualname__}",
            mode=LIBRARY, estimator="own", placement="loss", policy="on", rel_err=None, cosine=None, norm_ratio=None,
            verdict=NOT_COVERED,
            reason=f"{cls.__qualname__} overrides GRPOTrainer._compute_loss with its own KL block: kl-patches' GRPO "
                   f"patch does not reach it (a patched mode raises PatchError on it instead of training)",
            fix="use GRPOTrainer with kl_mode, or beta=0", spec={}, notes=[],
        ))
    return records


def all_subclasses(cls) -> set:
    found = set()
    for sub in cls.__subclasses__():
        found.add(sub)
        found |= all_subclasses(sub)
    return found


# --------------------------------------------------------------------------------------------------------------
# The user's configuration
# --------------------------------------------------------------------------------------------------------------

#: The fields of the user's GRPOConfig that decide the KL gradient; everything else (model, data, devices,
#: logging, batch sizes) is replaced by the audit's tiny setup.
AUDITED_FIELDS = (
    "beta", "kl_mode", "loss_type", "use_bias_correction_kl", "importance_sampling_level", "epsilon",
    "epsilon_high", "delta", "scale_rewards", "multi_objective_aggregation", "top_entropy_quantile",
    "off_policy_mask_threshold", "mask_truncated_completions", "temperature", "sapo_temperature_neg",
    "sapo_temperature_pos", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg",
)


#: Settings of the user's machine, not of the KL gradient: dropped from a user's YAML before parsing.
DEVICE_FIELDS = frozenset((
    "bf16", "fp16", "tf32", "use_cpu", "deepspeed", "fsdp", "fsdp_config", "torch_compile", "torch_compile_backend",
    "torch_compile_mode", "gradient_checkpointing", "gradient_checkpointing_kwargs", "parallelism_config",
    "ddp_backend", "half_precision_backend", "use_liger_kernel", "liger_kernel_config", "push_to_hub",
    "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "report_to", "output_dir", "logging_dir",
    "log_completions_hub_repo", "cast_lm_head_to_fp32",
))


@dataclass
class UserConfig:
    config: Any  # kl-patches GRPOConfig as parsed by TRL's TrlParser
    mode: str
    mode_source: str
    off_policy: bool
    name: str
    notes: list[str]


def parse_user_config(config: str | None = None, args: Sequence[str] = ()) -> UserConfig:
    """Parse a TRL YAML config (``trl grpo --config``) and/or command line with TRL's own ``TrlParser`` over
    kl-patches' GRPOConfig (so ``kl_mode`` is a field like any other). Keys of the script's other dataclasses
    (model_name_or_path, dataset_name, ...) are ignored. The process environment is left as it was (TrlParser
    exports a YAML ``env:`` block)."""
    import yaml
    from trl import TrlParser

    from kl_patches.integrations.trl.trainer import GRPOConfig

    argv = list(args)
    raw: dict = {}
    notes = []
    with tempfile.TemporaryDirectory(prefix="kl-patches-trl-config-") as folder:
        if config is not None:
            if not os.path.isfile(config):
                raise FileNotFoundError(f"TRL config {config!r} does not exist")
            with open(config) as handle:
                raw = yaml.safe_load(handle) or {}
            if not isinstance(raw, dict):
                raise ValueError(f"TRL config {config} must contain a YAML mapping")
            # Device and distribution settings (bf16 on a GPU, deepspeed, ...) would fail or mean nothing on the
            # audit's CPU float64 model: parse a copy without them.
            dropped = sorted(key for key in raw if key in DEVICE_FIELDS)
            if dropped:
                notes.append(f"replaced by the audit's CPU float64 setup: {', '.join(dropped)}")
            sanitized = os.path.join(folder, "config.yaml")
            with open(sanitized, "w") as handle:
                yaml.safe_dump({k: v for k, v in raw.items() if k not in DEVICE_FIELDS}, handle)
            argv += ["--config", sanitized]
        argv += ["--use_cpu", "true", "--bf16", "false", "--fp16", "false",
                 "--output_dir", os.path.join(folder, "out")]
        saved = dict(os.environ)
        try:
            parsed, _remaining = TrlParser((GRPOConfig,)).parse_args_and_config(argv, return_remaining_strings=True)
        finally:
            os.environ.clear()
            os.environ.update(saved)

    explicit = "kl_mode" in raw or any(a.split("=")[0] in ("--kl_mode", "--kl-mode") for a in argv)
    yaml_env = (raw.get("env") or {}) if isinstance(raw.get("env") or {}, dict) else {}
    if explicit:
        mode, source = parsed.kl_mode, "kl_mode"
        notes.append("kl_mode is read by kl_patches.integrations.trl.GRPOConfig; TRL's own `trl grpo` does not know "
                     f"it: there set {ENV_VAR} instead")
    elif yaml_env.get(ENV_VAR):
        mode, source = validate_mode(str(yaml_env[ENV_VAR]).strip()), f"env: {ENV_VAR} in the YAML"
        notes.append(f"{ENV_VAR} from the YAML env: block reaches processes started after parsing (the `trl grpo` "
                     "launcher's training process), not the parsing process itself")
    elif mode_from_env() is not None:
        mode, source = mode_from_env(), f"{ENV_VAR} in this environment"
    else:
        mode, source = LIBRARY, "no kl_mode and no KL_PATCHES_MODE: TRL's own KL"
    generate_every = parsed.steps_per_generation * parsed.num_iterations
    off_policy = (parsed.num_iterations > 1 or parsed.gradient_accumulation_steps % generate_every != 0
                  or parsed.use_vllm)
    if parsed.use_vllm:
        notes.append("use_vllm: the audit samples from a stale policy (old_per_token_logps) instead of a vLLM engine")
    if parsed.entropy_coef:
        notes.append(f"entropy_coef={parsed.entropy_coef} left out: the entropy bonus is not part of the KL gradient")
    name = os.path.basename(config) if config else "command line"
    return UserConfig(parsed, mode, source, off_policy, name, notes)


def beta_zero_record(spec: PolicySpec, user: UserConfig, settings: dict) -> AuditRecord:
    """beta = 0: TRL computes no KL (no reference model) and kl-patches changes nothing. The KL part of the
    gradient should be beta * grad KL_seq = 0: measured on the real trainer (zero task reward), not assumed."""
    from kl_patches.audit.engine import expected_gradient

    tiny = build_tiny_trainer(spec, **settings)
    gradient = expected_gradient(tiny.problem, per_group_loss_fn(tiny, fixed_num_items(tiny.problem)), GROUP_SIZE)
    norm = float(gradient.gradient.norm())
    return AuditRecord(
        library=LIBRARY_NAME, library_version=kl.trl_version(), configuration=f"{user.name}: beta=0 (no KL term)",
        mode=user.mode, estimator="none", placement="none", policy="on", rel_err=None, cosine=None,
        norm_ratio=norm, verdict=EXACT if norm == 0.0 else BIASED,
        reason=("beta=0: TRL loads no reference model and adds no KL; the audited KL gradient is exactly zero = "
                "beta * grad KL_seq (kl-patches changes nothing; set beta > 0 to regularise toward the reference)"
                if norm == 0.0 else f"beta=0 but TRL's loss still has a gradient of norm {norm:.3e} with zero reward"),
        fix=None if norm == 0.0 else "report to kl-patches", spec={**spec.as_dict(), "group_size": GROUP_SIZE},
        notes=[f"mode from {user.mode_source}", *user.notes], user_config=True,
    )


def audit_user_config(spec: PolicySpec, user: UserConfig) -> list[AuditRecord]:
    cfg = user.config
    settings = {name: getattr(cfg, name) for name in AUDITED_FIELDS if hasattr(cfg, name)}
    settings.pop("kl_mode", None)
    if float(cfg.beta) == 0.0:
        return [beta_zero_record(spec, user, settings)]
    shown = ", ".join(f"{k}={settings[k]}" for k in ("beta", "loss_type", "use_bias_correction_kl",
                                                      "importance_sampling_level") if k in settings)
    configuration = f"{user.name}: {shown}" + ("" if user.mode == LIBRARY else f", kl_mode={user.mode}")
    cell = Cell(configuration, settings=settings, mode=user.mode)
    records = []
    truth: dict = {}
    for regime in ("on", "off") if user.off_policy else ("on",):
        records.append(audit_cell(spec, cell, regime, truth_cache=truth, user_config=True,
                                  extra_notes=[f"mode from {user.mode_source}", *user.notes],
                                  off_policy_config=user.off_policy))
    return records


# --------------------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """The audit's tensors are tiny: intra-op threads only add synchronisation (x100 slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No progress bars, deprecation warnings or per-trainer log lines from transformers / TRL while auditing."""
    import logging

    import transformers

    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    loggers = {name: logging.getLogger(name).level for name in ("trl", "accelerate", "datasets")}
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level)


def audit(spec: PolicySpec | None = None, *, config: str | None = None, args: Sequence[str] = ()) -> list[AuditRecord]:
    """Audit TRL's KL configurations (or the user's, with ``config``/``args``) through TRL's own trainers.

    Without ``config``/``args``: unpatched GRPO configurations (defaults with beta > 0, without the bias
    correction, sequence-level importance sampling, each loss type), RLOO, then each kl-patches mode, on- and
    off-policy, plus a ``not covered`` record for every trainer overriding ``_compute_loss``."""
    spec = PolicySpec() if spec is None else spec
    require_version(LIBRARY_NAME, kl.SUPPORTED)
    with single_thread(), quiet():
        if config is not None or args:
            return audit_user_config(spec, parse_user_config(config, args))
        records = []
        truth: dict = {}
        for cell in default_cells():
            for regime in cell.regimes:
                records.append(audit_cell(spec, cell, regime, truth_cache=truth))
        records.extend(not_covered_records())
        return records


__all__ = [
    "audit", "build_tiny_trainer", "trl_loss", "trl_group_losses", "TinyTRL", "HFPolicy", "ResponseFeeder",
    "build_model", "build_tokenizer", "use_float64_log_probs", "parse_user_config", "default_cells", "Cell",
    "audit_cell", "EXACT", "BIASED", "NOT_COVERED",
]
