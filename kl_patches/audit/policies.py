"""Autoregressive policies small enough to enumerate every response.

The vocabulary includes EOS, so responses have lengths 1..horizon: a response ends at its first EOS, or is
truncated at ``horizon`` without one (as a generation cut at ``max_completion_length`` is). Responses are
right-padded with ``pad_id`` and carry a boolean mask (True for response tokens, EOS included).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import asdict, dataclass
from typing import Literal, TypeAlias

import torch
from torch import nn

Tensor: TypeAlias = torch.Tensor


@dataclass(frozen=True)
class PolicySpec:
    """Everything needed to rebuild one audit cell's policies: recorded on every audit record."""

    kind: Literal["tabular", "transformer"] = "tabular"
    vocab: int = 3  # including EOS
    horizon: int = 3
    seed: int = 0
    distance: float = 0.5  # scale of the perturbation pi_ref = pi_theta + distance * noise
    staleness: float = 0.3  # scale of the perturbation mu = pi_theta + staleness * noise (off-policy)

    def __post_init__(self) -> None:
        if self.kind not in ("tabular", "transformer"):
            raise ValueError(f"unknown policy kind {self.kind!r}; choose 'tabular' or 'transformer'")
        if self.vocab < 2:
            raise ValueError(f"vocab must be >= 2 (EOS plus at least one token), got {self.vocab}")
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        if self.distance <= 0:
            raise ValueError("distance must be > 0: at pi_theta = pi_ref the KL gradient is zero")
        if self.staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {self.staleness}")

    @property
    def eos_id(self) -> int:
        return self.vocab - 1

    def as_dict(self) -> dict:
        return asdict(self)


def enumerate_responses(vocab: int, horizon: int, eos_id: int | None = None, pad_id: int = 0):
    """Every response: (tokens (N, horizon) long, mask (N, horizon) bool), shortest first."""
    eos_id = vocab - 1 if eos_id is None else eos_id
    body = [v for v in range(vocab) if v != eos_id]
    rows: list[list[int]] = []
    lengths: list[int] = []
    for length in range(1, horizon + 1):
        for prefix in itertools.product(body, repeat=length - 1):
            rows.append(list(prefix) + [eos_id])
            lengths.append(length)
    for full in itertools.product(body, repeat=horizon):  # truncated without EOS
        rows.append(list(full))
        lengths.append(horizon)
    tokens = torch.full((len(rows), horizon), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), horizon), dtype=torch.bool)
    for i, (row, length) in enumerate(zip(rows, lengths)):
        tokens[i, :length] = torch.tensor(row[:length])
        mask[i, :length] = True
    return tokens, mask


class EnumerablePolicy(nn.Module):
    """A policy whose per-token log-probs of given responses can be computed (differentiably).

    Adapters wrap a library's model (a Hugging Face causal LM with a fixed prompt) in a subclass to audit the
    library's own loss code on it.
    """

    vocab_size: int
    eos_id: int
    horizon: int

    def token_logprobs(self, tokens: Tensor, mask: Tensor) -> Tensor:  # pragma: no cover - abstract
        """log pi(y_t | s_t), shape (N, horizon), 0 at masked positions."""
        raise NotImplementedError

    @torch.no_grad()
    def perturbed(self, scale: float, seed: int) -> "EnumerablePolicy":
        """A copy with every parameter moved by ``scale`` * N(0, 1) noise (reference / behaviour policies)."""
        clone = copy.deepcopy(self)
        generator = torch.Generator().manual_seed(seed)
        for parameter in clone.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
            parameter.requires_grad_(False)
        return clone


class TabularPolicy(EnumerablePolicy):
    """One free logit vector per prefix: the most general policy over responses of length <= horizon."""

    def __init__(self, vocab: int, horizon: int, seed: int = 0, scale: float = 1.0, dtype=torch.float64):
        super().__init__()
        self.vocab_size, self.horizon, self.eos_id = vocab, horizon, vocab - 1
        # A prefix of length t is coded base (vocab + 1) with digits token + 1, so codes of different lengths
        # never collide; the table has a row for every code below (vocab + 1) ** (horizon - 1) * vocab + 1.
        self.num_codes = sum((vocab + 1) ** t for t in range(horizon)) * (vocab + 1)
        generator = torch.Generator().manual_seed(seed)
        self.logits = nn.Parameter(scale * torch.randn(self.num_codes, vocab, generator=generator, dtype=dtype))

    def prefix_codes(self, tokens: Tensor) -> Tensor:
        codes = torch.zeros(tokens.shape, dtype=torch.long)
        for t in range(1, tokens.shape[1]):
            codes[:, t] = codes[:, t - 1] * (self.vocab_size + 1) + tokens[:, t - 1] + 1
        return codes.clamp(max=self.num_codes - 1)

    def token_logprobs(self, tokens: Tensor, mask: Tensor) -> Tensor:
        log_probs = torch.log_softmax(self.logits[self.prefix_codes(tokens)], dim=-1)
        chosen = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return torch.where(mask, chosen, torch.zeros((), dtype=chosen.dtype))


class TinyTransformerPolicy(EnumerablePolicy):
    """A one-layer causal transformer built from a config in code (no download): a neural, shared-parameter
    policy, where one parameter moves the probabilities of many prefixes at once."""

    def __init__(self, vocab: int, horizon: int, seed: int = 0, d_model: int = 16, heads: int = 2,
                 layers: int = 1, dtype=torch.float64):
        super().__init__()
        self.vocab_size, self.horizon, self.eos_id = vocab, horizon, vocab - 1
        torch.manual_seed(seed)
        self.bos_id = vocab
        self.embed = nn.Embedding(vocab + 1, d_model)
        self.position = nn.Embedding(horizon, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0,
                                           batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)
        self.to(dtype)

    def token_logprobs(self, tokens: Tensor, mask: Tensor) -> Tensor:
        n, horizon = tokens.shape
        inputs = torch.cat([torch.full((n, 1), self.bos_id, dtype=torch.long), tokens[:, :-1]], dim=1)
        hidden = self.embed(inputs) + self.position(torch.arange(horizon))
        causal = nn.Transformer.generate_square_subsequent_mask(horizon, dtype=hidden.dtype)
        hidden = self.body(hidden, mask=causal, is_causal=True)
        log_probs = torch.log_softmax(self.head(hidden), dim=-1)
        chosen = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return torch.where(mask, chosen, torch.zeros((), dtype=chosen.dtype))


def build_policy(spec: PolicySpec) -> EnumerablePolicy:
    if spec.kind == "tabular":
        return TabularPolicy(spec.vocab, spec.horizon, seed=spec.seed)
    return TinyTransformerPolicy(spec.vocab, spec.horizon, seed=spec.seed)
