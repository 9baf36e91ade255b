"""A real Ray run on this machine: verl's own launcher starts the trainer and the workers, and the probes run
inside those processes.

``verl.trainer.main_ppo.run_ppo`` (what ``python -m verl.trainer.main_ppo`` calls) initialises a local Ray
cluster with the runtime environment verl builds (``get_ppo_ray_runtime_env``) and starts a ``TaskRunner``
actor; the probe TaskRunner then starts a verl ``RayWorkerGroup`` (placement group, worker env vars, the
``Worker`` base class) the way verl's trainers start ``ActorRolloutRefWorker``. No test code patches anything:
whatever is patched in those processes was patched on ``import verl`` by the ``verl.plugins`` entry point (0.9) or
by the module ``VERL_USE_EXTERNAL_MODULES`` names (0.8: exported before the run, as docs/verl.md says).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from kl_patches.audit.tolerances import RAY_ROUND_TRIP

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")


def probe_batch() -> dict:
    """Two groups of two right-padded responses, stale old log-probs (as in a later mini-batch)."""
    generator = torch.Generator().manual_seed(7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    logp = -torch.rand(4, 4, generator=generator, dtype=torch.float64) * 2 * mask
    ref = -torch.rand(4, 4, generator=generator, dtype=torch.float64) * 2 * mask
    old = (logp + 0.3 * torch.randn(4, 4, generator=generator, dtype=torch.float64)) * mask
    scores = torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=torch.float64)
    return {"tokens": torch.ones(4, 4, dtype=torch.long) * mask, "mask": mask, "logp": logp, "ref": ref, "old": old,
            "group_ids": torch.tensor([0, 0, 1, 1]), "scores": scores}


def as_batch(raw: dict, requires_grad: bool = False):
    from kl_patches.audit import AuditBatch

    logp = raw["logp"].clone().requires_grad_(requires_grad)
    return AuditBatch(raw["tokens"], raw["mask"], logp, raw["ref"], raw["old"], raw["group_ids"],
                      torch.arange(4), 2, False)


def process_report() -> dict:
    """What this process has: the plugin's state and where verl's KL functions point."""
    import verl.trainer.ppo.core_algos as core_algos
    import verl.trainer.ppo.ray_trainer as ray_trainer
    import verl.workers.engine_workers as engine_workers
    import verl.workers.utils.losses as losses

    import kl_patches.integrations.verl as adapter

    def patched(obj) -> bool:
        return bool(getattr(obj, "__kl_patches__", False))

    return {
        "pid": os.getpid(),
        "enabled_mode": adapter.enabled_mode(),
        "plugin_error": adapter.plugin_error(),
        "losses.ppo_loss": patched(losses.ppo_loss),
        "engine_workers.ppo_loss": patched(engine_workers.ppo_loss) and engine_workers.ppo_loss is losses.ppo_loss,
        "core_algos.kl_penalty": patched(core_algos.kl_penalty),
        "ray_trainer.apply_kl_penalty": patched(ray_trainer.apply_kl_penalty),
        "ray_trainer.compute_advantage": patched(ray_trainer.compute_advantage),
    }


def worker_losses(actor_node, raw: dict) -> dict:
    """verl's ppo_loss in this process, for the run's actor config and for verl's own k3 (zero advantages)."""
    from omegaconf import OmegaConf

    from kl_patches.integrations.verl.audit import KLSettings, verl_actor_loss

    out = {}
    cases = {"run_config": KLSettings(actor_node=OmegaConf.create(actor_node)),
             "verl_low_var_kl": KLSettings(use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=0.5)}
    for name, settings in cases.items():
        batch = as_batch(raw, requires_grad=True)
        loss, metrics = verl_actor_loss(batch, settings, batch_num_tokens=10.0, global_batch_size=4)
        (grad,) = torch.autograd.grad(loss, batch.logp)
        out[name] = {"loss": loss.item(), "grad": grad.tolist()}
    return out


def trainer_advantages(algorithm_node, raw: dict) -> list:
    """verl's apply_kl_penalty + compute_advantage in this process, for the run's algorithm config."""
    from kl_patches.integrations.verl.audit import KLSettings, reward_advantages

    settings = KLSettings(use_kl_in_reward=algorithm_node["use_kl_in_reward"], kl_penalty=algorithm_node["kl_penalty"],
                          kl_coef=algorithm_node["kl_ctrl"]["kl_coef"], adv_estimator=algorithm_node["adv_estimator"],
                          norm_adv_by_std_in_grpo=algorithm_node["norm_adv_by_std_in_grpo"])
    return reward_advantages(as_batch(raw), settings, scores=raw["scores"]).tolist()


def make_probe_classes():
    """The TaskRunner and the worker, built here so cloudpickle ships them to the actors by value."""
    from omegaconf import OmegaConf

    from verl.single_controller.base import Worker
    from verl.single_controller.base.decorator import Dispatch, register
    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

    class KLProbeWorker(Worker):
        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def probe(self, actor_node, raw):
            return {"process": process_report(), "losses": worker_losses(actor_node, raw)}

    class ProbeTaskRunner:
        def run(self, config):
            raw = probe_batch()
            report = {"task_runner": process_report(),
                      "advantages": trainer_advantages(OmegaConf.to_container(config.algorithm, resolve=True), raw)}
            pool = RayResourcePool(process_on_nodes=[1], use_gpu=False, max_colocate_count=1)
            workers = RayWorkerGroup(pool, RayClassWithInitArgs(cls=ray.remote(KLProbeWorker)), device_name="cpu")
            actor_node = OmegaConf.to_container(config.actor_rollout_ref.actor, resolve=True)
            report["worker"] = workers.probe(actor_node, raw)[0]
            with open(config.kl_probe_output, "w") as handle:
                json.dump(report, handle)

    return ProbeTaskRunner


@pytest.fixture(scope="module")
def ray_report(tmp_path_factory):
    from omegaconf import open_dict

    import verl.trainer.main_ppo as main_ppo
    from kl_patches.integrations.verl.audit import load_user_config

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    output = tmp_path_factory.mktemp("ray") / "report.json"
    config = load_user_config(args=[
        "actor_rollout_ref.actor.use_kl_loss=True", "actor_rollout_ref.actor.kl_loss_type=k1-rtg-loss",
        "actor_rollout_ref.actor.kl_loss_coef=0.25", "algorithm.use_kl_in_reward=True",
        "algorithm.kl_penalty=k1-in-reward", "algorithm.kl_ctrl.kl_coef=0.5", "algorithm.adv_estimator=grpo",
        "ray_kwargs.ray_init.num_cpus=2", "data.train_batch_size=256", f"data.max_response_length={MAX_LENGTH}",
    ])
    # what main_ppo's main() does before run_ppo: kl-patches' driver checks hand the workers their fixed settings
    from kl_patches.integrations.verl.config import check_trainer_config

    check_trainer_config(config)
    with open_dict(config):
        config.kl_probe_output = str(output)
    assert not ray.is_initialized()
    # Ray puts the driver's working directory on the workers' sys.path; a checkout's root holds the kl_patches
    # *source* (integrations/ is only mapped in by the wheel), which would shadow the installed package there.
    # A user's run starts from their own directory; so does this one.
    cwd = os.getcwd()
    os.chdir(output.parent)
    from kl_patches.integrations.verl import compat

    env = {} if compat.loads_entry_points(installed_version_of_verl()) else {compat.PLUGIN_ENV: compat.PLUGIN_MODULE}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # what the user exports before `python -m verl.trainer.main_ppo` on verl 0.8
    try:
        main_ppo.run_ppo(config, task_runner_class=ray.remote(num_cpus=1)(make_probe_classes()))
    finally:
        ray.shutdown()
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return json.loads(output.read_text())


MAX_LENGTH = 8  # data.max_response_length of the probed run


def installed_version_of_verl() -> str:
    import importlib.metadata

    return importlib.metadata.version("verl")


def expected_losses(raw: dict) -> dict:
    """The same quantities in this process, from the core (k1-rtg-loss) and verl's unpatched function (k3)."""
    from kl_patches import terms
    from kl_patches.integrations.verl.audit import KLSettings, actor_config, micro_batch

    import verl.workers.utils.losses as losses

    out = {}
    batch = as_batch(raw, requires_grad=True)
    # no baseline, normaliser fixed from the configuration: global_batch_size (4) x data.max_response_length
    loss = 0.25 * terms.kl_rtg_loss(batch.logp, batch.ref_logp, batch.mask, beta=1.0, behaviour_logp=batch.behaviour_logp,
                                    normalizer=4 * MAX_LENGTH)
    (grad,) = torch.autograd.grad(loss, batch.logp)
    out["run_config"] = {"loss": loss.item(), "grad": grad}
    batch = as_batch(raw, requires_grad=True)
    settings = KLSettings(use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=0.5)
    model_output, data = micro_batch(batch, batch_num_tokens=10.0, global_batch_size=4)
    original = getattr(losses.ppo_loss, "__wrapped__", losses.ppo_loss)
    loss, _ = original(actor_config(settings), model_output, data)
    (grad,) = torch.autograd.grad(loss, batch.logp)
    out["verl_low_var_kl"] = {"loss": loss.item(), "grad": grad}
    return out


def test_plugin_is_active_in_the_task_runner_and_the_worker(ray_report):
    driver = os.getpid()
    for process in (ray_report["task_runner"], ray_report["worker"]["process"]):
        assert process["pid"] != driver
        assert process["enabled_mode"] == "library" and process["plugin_error"] is None
        assert all(process[key] for key in process if "." in key), process
    assert ray_report["task_runner"]["pid"] != ray_report["worker"]["process"]["pid"]


def test_worker_ppo_loss_is_kl_patches_for_kl_patches_config_and_verl_otherwise(ray_report):
    expected = expected_losses(probe_batch())
    for name in ("run_config", "verl_low_var_kl"):
        got = ray_report["worker"]["losses"][name]
        assert got["loss"] == pytest.approx(expected[name]["loss"], rel=RAY_ROUND_TRIP["rtol"],
                                           abs=RAY_ROUND_TRIP["atol"])
        torch.testing.assert_close(torch.tensor(got["grad"], dtype=torch.float64), expected[name]["grad"],
                                   **RAY_ROUND_TRIP)
    assert ray_report["worker"]["losses"]["run_config"]["loss"] != pytest.approx(
        ray_report["worker"]["losses"]["verl_low_var_kl"]["loss"])


def test_task_runner_advantages_are_kl_patches_k1_in_reward(ray_report):
    """GRPO with std normalisation on the task scores only, then -beta*(KL_i - b_i) added, in the TaskRunner."""
    from kl_patches import terms
    from kl_patches.integrations.verl.audit import KLSettings, reward_advantages

    raw = probe_batch()
    batch = as_batch(raw)
    task_only = reward_advantages(batch, KLSettings(adv_estimator="grpo"), scores=raw["scores"])
    kl_part = terms.kl_advantage(raw["old"], raw["ref"], raw["mask"], beta=0.5, group_ids=raw["group_ids"])
    expected = task_only + kl_part[:, None] * raw["mask"]
    torch.testing.assert_close(torch.tensor(ray_report["advantages"], dtype=torch.float64), expected.to(torch.float64),
                               rtol=1e-6, atol=1e-7)
