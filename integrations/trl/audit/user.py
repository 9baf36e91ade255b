"""``kl-patches check --library trl --config x.yaml`` (or a command line): the user's GRPOConfig, parsed by TRL's own
``TrlParser`` over kl-patches' GRPOConfig, its mode resolved exactly as the trainer resolves it
(:func:`kl_patches.modes.resolve_mode`: an explicit ``kl_mode`` beats ``KL_PATCHES_MODE``, which beats the
default ``k1-rtg-loss``), then audited through GRPOTrainer's real step with the user's KL-relevant settings.

The batch sizes are the audit's (enumerable), but the *structure* is the user's: generation ahead of optimisation
(``steps_per_generation > gradient_accumulation_steps``), reuse (``num_iterations > 1``) and vLLM (with the user's
``vllm_importance_sampling_correction``; both a matching and a mismatched sampler) each become a regime of the
step audit. Settings kl-patches refuses (truncated sampler, k1-in-reward off-policy, ...) are reported biased with
the refusal and its fix.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Sequence

from kl_patches.audit import AuditRecord, PolicySpec
from kl_patches.audit.records import BIASED, EXACT
from kl_patches.modes import ENV_VAR, LIBRARY, mode_from_env

from kl_patches.integrations.trl import config as trl_config
from kl_patches.integrations.trl import kl
from kl_patches.integrations.trl.audit.cells import Cell, audit_cell
from kl_patches.integrations.trl.audit.harness import (
    GROUP_SIZE,
    LIBRARY_NAME,
    build_tiny_trainer,
    fixed_num_items,
    per_group_loss_fn,
)

#: The fields of the user's GRPOConfig that decide the KL gradient; everything else (model, data, devices,
#: logging, batch sizes) is replaced by the audit's tiny setup.
AUDITED_FIELDS = (
    "beta", "loss_type", "use_bias_correction_kl", "importance_sampling_level", "epsilon",
    "epsilon_high", "delta", "scale_rewards", "multi_objective_aggregation", "top_entropy_quantile",
    "off_policy_mask_threshold", "mask_truncated_completions", "temperature", "sapo_temperature_neg",
    "sapo_temperature_pos", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg",
    "top_p", "top_k", "min_p", "kl_truncation", "kl_rtg_baseline", "vllm_importance_sampling_mode",
    "vllm_importance_sampling_cap", "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max",
)

#: Settings of the user's machine, not of the KL gradient: dropped from a user's YAML before parsing.
DEVICE_FIELDS = frozenset((
    "bf16", "fp16", "tf32", "use_cpu", "deepspeed", "fsdp", "fsdp_config", "torch_compile", "torch_compile_backend",
    "torch_compile_mode", "gradient_checkpointing", "gradient_checkpointing_kwargs", "parallelism_config",
    "ddp_backend", "half_precision_backend", "use_liger_kernel", "liger_kernel_config", "push_to_hub",
    "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "report_to", "output_dir", "logging_dir",
    "log_completions_hub_repo", "cast_lm_head_to_fp32", "use_vllm", "vllm_mode", "vllm_server_host",
    "vllm_server_port", "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size",
))


@dataclass
class UserConfig:
    config: Any  # kl-patches GRPOConfig as parsed by TRL's TrlParser
    mode: str
    mode_source: str
    use_vllm: bool
    regimes: tuple[str, ...]
    name: str
    notes: list[str]

    @property
    def off_policy(self) -> bool:
        return self.regimes != ("on",)


def parse_user_config(config: str | None = None, args: Sequence[str] = ()) -> UserConfig:
    """Parse a TRL YAML config (``trl grpo --config``) and/or command line with TRL's own ``TrlParser`` over
    kl-patches' GRPOConfig. Keys of the script's other dataclasses (model_name_or_path, dataset_name, ...) are
    ignored. The process environment is left as it was (TrlParser exports a YAML ``env:`` block): the mode is
    resolved with that block in view, as the training process (started after parsing) would see it."""
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
            dropped = sorted(key for key in raw if key in DEVICE_FIELDS and key != "use_vllm")
            if dropped:
                notes.append(f"replaced by the audit's CPU float64 setup: {', '.join(dropped)}")
            sanitized = os.path.join(folder, "config.yaml")
            with open(sanitized, "w") as handle:
                yaml.safe_dump({k: v for k, v in raw.items() if k not in DEVICE_FIELDS}, handle)
            argv += ["--config", sanitized]
        use_vllm = bool(raw.get("use_vllm", False))
        for flag in ("--use_vllm", "--use-vllm"):
            if flag in argv:
                at = argv.index(flag)
                value = argv[at + 1] if at + 1 < len(argv) and not argv[at + 1].startswith("--") else "true"
                use_vllm = value.lower() in ("1", "true", "yes")
                del argv[at:at + (2 if at + 1 < len(argv) and not argv[at + 1].startswith("--") else 1)]
        argv += ["--use_cpu", "true", "--bf16", "false", "--fp16", "false",
                 "--output_dir", os.path.join(folder, "out")]
        saved = dict(os.environ)
        try:
            parsed, _remaining = TrlParser((GRPOConfig,)).parse_args_and_config(argv, return_remaining_strings=True)
            # GRPOConfig.__post_init__ resolved the mode with the YAML env: block exported, as the training
            # process (started after parsing) sees it: the same resolve_mode call the trainer makes.
            mode, origin = parsed.kl_mode, parsed.kl_mode_origin
            from_env = mode_from_env()
        finally:
            os.environ.clear()
            os.environ.update(saved)
    yaml_env = raw.get("env") if isinstance(raw.get("env"), dict) else {}
    if origin == ENV_VAR:
        source = f"{ENV_VAR} in the YAML env: block" if yaml_env.get(ENV_VAR) else f"{ENV_VAR} in this environment"
    elif origin == "default":
        source = "the default of kl_patches.integrations.trl.GRPOConfig"
        notes.append(f"no kl_mode and no {ENV_VAR}: kl-patches' GRPOConfig trains k1-rtg-loss; TRL's own `trl grpo` "
                     f"(without kl-patches' GRPOConfig) trains TRL's k3 -- audit that with kl_mode: library")
    else:
        source = "kl_mode"
        if from_env is not None and from_env != mode:
            notes.append(f"kl_mode={mode!r} overrides {ENV_VAR}={from_env!r} (an explicit configuration beats the "
                         f"environment, in the trainer as here)")
        notes.append(f"kl_mode is read by kl_patches.integrations.trl.GRPOConfig; TRL's own `trl grpo` does not know "
                     f"it: there set {ENV_VAR} instead")
    generate_every = parsed.steps_per_generation * parsed.num_iterations
    regimes = ["on"]
    if parsed.num_iterations > 1 or parsed.gradient_accumulation_steps % generate_every != 0:
        regimes.append("off")
    if use_vllm:
        correction = bool(parsed.vllm_importance_sampling_correction)
        regimes = [r for r in regimes if r != "on"] + (["vllm", "vllm-mismatch"] if correction
                                                       else ["vllm", "vllm-uncorrected"])
        notes.append("use_vllm: emulated through TRL's vLLM branch (per-token sampling log-probs from the feeder), "
                     "with a sampler equal to the policy and a perturbed one")
    if getattr(parsed, "entropy_coef", None):  # TRL 1.x only
        notes.append(f"entropy_coef={parsed.entropy_coef} left out: the entropy bonus is not part of the KL gradient")
    name = os.path.basename(config) if config else "command line"
    return UserConfig(parsed, mode, source, use_vllm, tuple(regimes), name, notes)


def beta_zero_record(spec: PolicySpec, user: UserConfig, settings: dict) -> AuditRecord:
    """beta = 0: TRL computes no KL (no reference model) and kl-patches changes nothing. The KL part of the
    gradient should be beta * grad KL_seq = 0: measured on the real trainer (zero task reward), not assumed."""
    from kl_patches.audit.engine import expected_gradient

    settings = {k: v for k, v in settings.items() if not k.startswith("kl_")}
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
    if user.mode == LIBRARY:
        settings = {k: v for k, v in settings.items() if not k.startswith("kl_")}
    if float(cfg.beta) == 0.0:
        return [beta_zero_record(spec, user, {k: v for k, v in settings.items() if not k.startswith("top")})]
    if cfg.num_iterations > 1:
        settings["num_iterations"] = 2  # the reuse structure at the smallest size that has it
    shown = ", ".join(f"{k}={settings[k]}" for k in ("beta", "loss_type", "use_bias_correction_kl",
                                                      "importance_sampling_level") if k in settings)
    configuration = f"{user.name}: {shown}" + ("" if user.mode == LIBRARY else f", kl_mode={user.mode}")
    # kl-patches modes through GRPOTrainer's step; TRL's own KL (biased anyway) through the loss, as in the table.
    driver = "loss" if user.mode == LIBRARY else "step"
    regimes = tuple(r for r in user.regimes if driver == "step" or r in ("on", "off")) or ("on",)
    cell = Cell(configuration, settings=settings, mode=user.mode, driver=driver, regimes=regimes)
    refused = [] if user.mode == LIBRARY else trl_config.refusals(cfg, user.mode, use_vllm=user.use_vllm)
    records = []
    truth: dict = {}
    for regime in regimes:
        records.append(audit_cell(spec, cell, regime, truth_cache=truth, user_config=True,
                                  extra_notes=[f"mode from {user.mode_source}", *user.notes],
                                  off_policy_config=user.off_policy, refused_by_config=refused))
    return records
