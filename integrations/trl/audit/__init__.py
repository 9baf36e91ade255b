"""The exact audit of TRL's KL through its own code: ``kl-patches check --library trl`` (and ``--config``).

    harness.py  drives GRPOTrainer / RLOOTrainer on enumerated responses: the real training step
                (:func:`harness.step_fn`) or compute_loss per group (:func:`harness.per_group_loss_fn`)
    cells.py    which configurations are audited, in which regimes (on, off, vllm, vllm-mismatch, ...), what each
                should give
    user.py     the user's YAML / command line, parsed by TRL's TrlParser, mode resolved as the trainer resolves it
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Sequence

import torch

from kl_patches.audit import AuditRecord, PolicySpec
from kl_patches.audit.records import BIASED, EXACT, NOT_COVERED
from kl_patches.integrations.trl import compat
from kl_patches.integrations.trl.audit.cells import Cell, audit_cell, default_cells, not_covered_records
from kl_patches.integrations.trl.audit.harness import (
    GROUP_SIZE,
    LIBRARY_NAME,
    HFPolicy,
    ResponseFeeder,
    TinyTRL,
    base_config,
    build_model,
    build_tiny_trainer,
    build_tokenizer,
    run_step,
    step_fn,
    tiny_model_path,
    trl_group_losses,
    trl_loss,
    use_float64_log_probs,
)
from kl_patches.integrations.trl.audit.user import audit_user_config, parse_user_config


DEFAULT_HORIZON = 2


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
    notes = []
    if spec is None or spec == PolicySpec():
        # The CLI's default spec (V=3, H=3) enumerates 225 groups per loss cell: TRL's check uses H=2 (49) to stay
        # fast; pass any other --vocab/--horizon/--seed to audit that spec instead.
        spec = PolicySpec(horizon=DEFAULT_HORIZON)
        notes.append(f"kl-patches check --library trl enumerates horizon {DEFAULT_HORIZON} by default")
    compat.require()
    with single_thread(), quiet():
        if config is not None or args:
            records = audit_user_config(spec, parse_user_config(config, args))
            for record in records:
                record.notes.extend(notes)
            return records
        records = []
        truth: dict = {}
        for cell in default_cells():
            for regime in cell.regimes:
                records.append(audit_cell(spec, cell, regime, truth_cache=truth, extra_notes=notes))
        records.extend(not_covered_records())
        return records


__all__ = [
    "audit", "build_tiny_trainer", "trl_loss", "trl_group_losses", "run_step", "step_fn", "TinyTRL", "HFPolicy",
    "ResponseFeeder", "build_model", "build_tokenizer", "use_float64_log_probs", "parse_user_config",
    "default_cells", "Cell", "audit_cell", "base_config", "tiny_model_path", "GROUP_SIZE", "EXACT", "BIASED",
    "NOT_COVERED",
]
