"""Drive verl's actor *step* on an enumerated generation batch (``kl_patches.audit.expected_step_gradient``).

What runs is verl's own code, with the user's configuration (a composed ``ppo_trainer`` DictConfig):

1. the driver: verl's ``validate_config`` (kl-patches' checks and the workers' fixed settings), a ``DataProto`` of
   the generation batch (one-token prompts, responses right-padded to ``data.max_response_length``, ``uid``),
   ``RayPPOTrainer._balance_batch`` when ``trainer.balance_batch`` (verl's own partitioning across ``dp`` ranks),
   ``apply_kl_penalty`` + ``compute_advantage`` when the KL is in the reward, the rank partition by
   ``DataProto.chunk`` (what verl's dispatch does), ``left_right_2_no_padding`` and the non-tensor fields of
   ``_update_actor``;
2. each rank (``dp`` simulated in one process): ``tu.make_iterator`` (verl's mini-batches), then what
   ``FSDPEngine.forward_backward_batch`` does around the model -- the global ``batch_num_tokens`` (summed over
   ranks, as its all-reduce), ``dp_size``, verl's ``prepare_micro_batches`` (fixed or dynamic batch sizes) -- and
   ``ppo_loss`` (the worker's loss function, from ``ActorConfig`` built by ``omega_conf_to_dataclass``) on every
   micro-batch, each ``backward`` accumulating into ``.grad``; the ranks' gradients are averaged as FSDP does.

The model is the audit's tiny enumerable policy (its log-probs laid out as verl's model output, no padding).
The log-probs the run would use: ``old_log_probs`` is the trainer's recomputation (the sampler's log-probs, or a
perturbed policy's when an engine/trainer ``mismatch`` is emulated) and ``rollout_log_probs`` the engine's (the
sampler's), present when ``rollout.calculate_log_probs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from kl_patches.audit import AuditBatch, AuditProblem
from kl_patches.audit.engine import accumulated_grad

Tensor = torch.Tensor


@dataclass
class StepHarness:
    """verl's step for one composed configuration on ``problem``'s tiny policy (see the module docstring)."""

    config: Any  # a composed ppo_trainer DictConfig (validated: kl-patches' settings installed)
    problem: AuditProblem
    dp_size: int = 1
    #: engine/trainer mismatch: old_log_probs come from the sampler perturbed by this distance (0: none)
    mismatch: float = 0.0

    def __post_init__(self) -> None:
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.config import ActorConfig

        actor = self.config.actor_rollout_ref.actor
        self.actor_config = omega_conf_to_dataclass(actor, ActorConfig) if "_target_" not in actor else \
            omega_conf_to_dataclass(actor)
        self.parameters = list(self.problem.parameters())
        sampler = self.problem.policy if self.problem.on_policy else self.problem.behaviour
        self.trainer_policy = sampler.perturbed(self.mismatch, seed=self.problem.spec.seed + 7_000) \
            if self.mismatch else None
        self.engine_log_probs = bool(self.config.actor_rollout_ref.rollout.get("calculate_log_probs", True))
        self.last_metrics: list[dict] = []
        self.placeholder_used = False  # compat.flash_attn_placeholder: verl 0.8 without flash-attn

    # ------------------------------------------------------------------------------------------- driver

    def generation_batch(self, batch: AuditBatch):
        """verl's DataProto of the generation batch, as the rollout hands it to the trainer."""
        from verl import DataProto

        mask = batch.mask
        n, horizon = mask.shape
        width = int(self.config.data.max_response_length)
        if width < horizon:
            raise ValueError(f"data.max_response_length={width} < the audit's horizon {horizon}")
        pad = width - horizon

        def right(x: Tensor, value=0) -> Tensor:
            return torch.nn.functional.pad(x, (0, pad), value=value)

        responses = right(torch.where(mask, batch.tokens, torch.zeros_like(batch.tokens)))
        response_mask = right(mask.long())
        prompts = torch.zeros(n, 1, dtype=torch.long)
        attention_mask = torch.cat([torch.ones(n, 1, dtype=torch.long), response_mask], dim=1)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        sampler_logp = batch.behaviour_logp.detach()
        if self.trainer_policy is not None:
            with torch.no_grad():
                trainer_logp = self.trainer_policy.token_logprobs(batch.tokens, mask)
        else:
            trainer_logp = sampler_logp
        tensors = {
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], dim=1),
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "response_mask": response_mask,
            "old_log_probs": right(trainer_logp * mask),
            "ref_log_prob": right(batch.ref_logp.detach() * mask),
            "token_level_scores": torch.zeros(n, width, dtype=sampler_logp.dtype),
            "kl_patches_audit_row": torch.arange(n),
        }
        if self.engine_log_probs:
            tensors["rollout_log_probs"] = right(sampler_logp * mask)
        uid = np.array([f"group-{int(g)}" for g in batch.group_ids], dtype=object)
        return DataProto.from_dict(tensors=tensors, non_tensors={"uid": uid})

    def driver(self, data):
        """balance_batch, the reward path, advantages: verl's trainer functions, in the order of its fit()."""
        from verl.trainer.ppo import core_algos, ray_trainer

        config = self.config
        if config.trainer.get("balance_batch", True):
            host = SimpleNamespace(config=config, actor_rollout_wg=None, use_prefix_grouper=False,
                                   _get_dp_size=lambda worker_group, role: self.dp_size)
            ray_trainer.RayPPOTrainer._balance_batch(host, data, metrics={})
        if config.algorithm.use_kl_in_reward:
            kl_ctrl = core_algos.get_kl_controller(config.algorithm.kl_ctrl)
            data, _ = ray_trainer.apply_kl_penalty(data, kl_ctrl=kl_ctrl, kl_penalty=config.algorithm.kl_penalty)
        else:
            data.batch["token_level_rewards"] = data.batch["token_level_scores"]
        if "values" not in data.batch.keys() and config.algorithm.adv_estimator == "gae":
            data.batch["values"] = torch.zeros_like(data.batch["token_level_rewards"])
        return ray_trainer.compute_advantage(
            data, adv_estimator=config.algorithm.adv_estimator, gamma=config.algorithm.gamma,
            lam=config.algorithm.lam, num_repeat=config.actor_rollout_ref.rollout.n,
            norm_adv_by_std_in_grpo=config.algorithm.get("norm_adv_by_std_in_grpo", True), config=config.algorithm,
        )

    def rank_batches(self, data) -> list:
        """The rank partition (verl's dispatch chunks the batch in order) and ``_update_actor``'s conversion."""
        from verl.utils import tensordict_utils as tu
        from verl.workers.utils.padding import left_right_2_no_padding

        actor = self.config.actor_rollout_ref.actor
        mini = int(actor.ppo_mini_batch_size) * int(self.config.actor_rollout_ref.rollout.n)
        out = []
        for part in data.chunk(self.dp_size):
            part.meta_info["temperature"] = self.config.actor_rollout_ref.rollout.temperature
            td = left_right_2_no_padding(part.to_tensordict())
            tu.assign_non_tensor(td, global_batch_size=mini, mini_batch_size=mini, epochs=int(actor.ppo_epochs),
                                 seed=int(actor.data_loader_seed), dataloader_kwargs={"shuffle": bool(actor.shuffle)},
                                 compute_loss=True)
            out.append(td)
        return out

    # ------------------------------------------------------------------------------------------- worker

    def model_output(self, micro, logp: Tensor) -> dict:
        """The policy's log-probs of the micro-batch's rows in verl's no-padding model-output layout (position p of
        a sequence predicts token p + 1; the last position of each sequence is a filler)."""
        rows = micro["kl_patches_audit_row"]
        rows = rows.values() if rows.is_nested else rows
        lengths = micro["response_mask"]
        lengths = lengths.offsets().diff() if lengths.is_nested else lengths.sum(-1)
        filler = torch.zeros(1, dtype=logp.dtype)
        pieces = []
        for row, length in zip(rows.tolist(), lengths.tolist()):
            pieces += [logp[row, :length], filler]  # one-token prompt: 1 + length positions
        return {"log_probs": torch.cat(pieces)}

    def worker_update(self, ranks: list, logp: Tensor) -> None:
        """``train_mini_batch`` on every rank in lockstep; gradients accumulate in ``.grad`` (summed over ranks)."""
        from verl.utils import tensordict_utils as tu
        from verl.workers.engine.utils import prepare_micro_batches
        from verl.workers.utils import losses

        actor = self.config.actor_rollout_ref.actor
        iterators = []
        for rank, td in enumerate(ranks):
            mini = tu.pop(td, key="mini_batch_size") // self.dp_size
            epochs = tu.pop(td, key="epochs", default=1)
            seed = tu.pop(td, key="seed", default=42)
            kwargs = tu.pop(td, key="dataloader_kwargs", default={})
            iterators.append(tu.make_iterator(td, mini_batch_size=mini, epochs=epochs, seed=seed + rank,
                                              dataloader_kwargs=kwargs))
        self.last_metrics = []
        for minis in zip(*iterators):
            # forward_backward_batch: the global token count (all-reduce over dp ranks), dp_size, micro-batches
            batch_num_tokens = int(sum(int(m["loss_mask"].values().sum() if m["loss_mask"].is_nested
                                           else m["loss_mask"].sum()) for m in minis))
            for mini_td in minis:
                tu.assign_non_tensor(
                    mini_td, batch_num_tokens=batch_num_tokens, dp_size=self.dp_size, sp_size=1,
                    use_dynamic_bsz=bool(actor.use_dynamic_bsz),
                    max_token_len_per_gpu=actor.get("ppo_max_token_len_per_gpu"),
                    micro_batch_size_per_gpu=actor.get("ppo_micro_batch_size_per_gpu"),
                )
                micro_batches, _ = prepare_micro_batches(data=mini_td, dp_group=None, same_micro_num_in_dp=True)
                for micro in micro_batches:
                    loss, metrics = losses.ppo_loss(self.actor_config, self.model_output(micro, logp), micro)
                    loss.backward(retain_graph=True)
                    self.last_metrics.append(metrics)

    def step(self, batch: AuditBatch) -> Tensor:
        """The flat gradient verl's step accumulates on the policy for this generation batch (FSDP's average over
        ranks), for ``expected_step_gradient``."""
        from kl_patches.integrations.verl.compat import flash_attn_placeholder

        for p in self.parameters:
            p.grad = None
        with flash_attn_placeholder() as self.placeholder_used:  # verl 0.8 on CPU only (compat.py)
            data = self.driver(self.generation_batch(batch))
            self.worker_update(self.rank_batches(data), batch.logp)
        return accumulated_grad(self.parameters) / self.dp_size
