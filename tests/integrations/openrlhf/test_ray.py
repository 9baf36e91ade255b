"""A real local Ray cluster: the patch is active in the job's worker processes with the runtime environment the
launcher builds, and inactive without the mode. (CPU: flash_attn / vLLM placeholders, see the notes below.)"""

import os

import pytest
import ray

from kl_patches.integrations.openrlhf.launcher import build_runtime_env

pytestmark = pytest.mark.slow

ALL_TARGETS = {
    "openrlhf.models.utils.compute_approx_kl",
    "openrlhf.trainer.ppo_utils.experience_maker.compute_approx_kl",  # the PPOTrainer actor's reward path
    "openrlhf.trainer.ray.ppo_actor.compute_approx_kl",
    "openrlhf.trainer.ray.ppo_actor.ActorPPOTrainer.training_step",  # the PolicyModelActor's loss
}


@ray.remote(num_cpus=0)
class Probe:
    """A worker of the job: imports OpenRLHF's KL code the way the PPOTrainer and PolicyModelActor processes do."""

    def report(self):
        from kl_patches.integrations.openrlhf.placeholders import install_placeholders

        install_placeholders()  # CPU machines only: the launcher's hook does not install placeholders
        import openrlhf.trainer.ppo_utils.experience_maker  # noqa: F401
        import openrlhf.trainer.ray.ppo_actor  # noqa: F401
        from kl_patches.integrations.openrlhf import enabled_mode
        from kl_patches.integrations.openrlhf.patches import patched_targets

        return {"pid": os.getpid(), "env": os.environ.get("KL_PATCHES_MODE"), "mode": enabled_mode(),
                "targets": patched_targets()}


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    # Workers start in the driver's directory: not the checkout, whose kl_patches/ would shadow the installed one.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KL_PATCHES_MODE", raising=False)  # the mode reaches workers through the runtime env only

    def start(runtime_env):
        ray.init(num_cpus=2, runtime_env=runtime_env, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)

    yield start
    ray.shutdown()


def test_the_launchers_runtime_env_patches_every_worker(cluster):
    cluster(build_runtime_env("k1-rtg-loss"))
    reports = ray.get([probe.report.remote() for probe in (Probe.remote(), Probe.remote())])
    assert len({r["pid"] for r in reports} | {os.getpid()}) == 3  # two worker processes besides this one
    for report in reports:
        assert report["env"] == "k1-rtg-loss" and report["mode"] == "k1-rtg-loss"
        assert set(report["targets"]) == ALL_TARGETS and all(report["targets"].values()), report


def test_a_real_policy_model_actor_is_patched(cluster):
    # Same environment with the CPU-only hook variant: OpenRLHF's actor class imports vLLM when Ray loads it in the
    # worker, so placeholders must exist before that (on a GPU machine the launcher's own hook is all it takes).
    cluster(build_runtime_env("k1-in-reward", placeholders=True))
    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor

    def probe_self(actor):  # runs inside the actor's process (nested: pickled by value, not by module)
        from kl_patches.integrations.openrlhf import enabled_mode
        from kl_patches.integrations.openrlhf.patches import patched_targets

        return {"pid": os.getpid(), "class": type(actor).__name__, "mode": enabled_mode(),
                "targets": patched_targets()}

    actor = PolicyModelActor.options(num_gpus=0, num_cpus=0).remote(1, 0, None, None)
    report = ray.get(actor.__ray_call__.remote(probe_self))
    assert report["class"] == "PolicyModelActor" and report["pid"] != os.getpid()
    assert report["mode"] == "k1-in-reward"
    assert report["targets"]["openrlhf.trainer.ray.ppo_actor.ActorPPOTrainer.training_step"]
    assert report["targets"]["openrlhf.models.utils.compute_approx_kl"]


def test_without_the_mode_no_worker_is_patched(cluster):
    cluster(build_runtime_env("library"))
    report = ray.get(Probe.remote().report.remote())
    assert report["env"] is None and report["mode"] is None
    assert set(report["targets"]) == ALL_TARGETS and not any(report["targets"].values()), report
