"""The exact audit through verl's own code: verdicts, agreement with the core reference, the user's
configuration (hydra overrides / YAML) with the override that fixes it, and the CLI's exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from kl_patches.audit import PolicySpec, expected_gradient, per_group
from kl_patches.audit import reference
from kl_patches.modes import KLModeError
from kl_patches.patching import installed_version
from kl_patches.audit.tolerances import ENUMERATION_REL, LIBRARY_GRADIENT, LIBRARY_PARITY

from kl_patches.integrations.verl.compat import loss_agg_modes

SPEC = PolicySpec()
#: loss_agg_mode values besides verl's default token-mean in the installed verl (4 in 0.9, 3 in 0.8: no token-sum)
OTHER_AGG_MODES = len(loss_agg_modes()) - 1


@pytest.fixture(scope="module")
def records():
    from kl_patches.integrations.verl.audit import audit

    return audit(SPEC)


def by_name(records, configuration, policy):
    found = [r for r in records if r.configuration == configuration and r.policy == policy]
    assert len(found) == 1, (configuration, policy)
    return found[0]


def test_records_cover_every_cell_on_and_off_policy(records):
    from kl_patches.integrations.verl.audit import check_step_cells, default_cells

    cells = default_cells()
    assert len(records) == 2 * (len(cells) + len(check_step_cells())) and len(cells) == 24 + 3 * OTHER_AGG_MODES
    assert {r.library for r in records} == {"verl"} and {r.library_version for r in records} == {installed_version("verl")}
    assert {r.policy for r in records} == {"on", "off"} and not any(r.user_config for r in records)
    assert not [r for r in records if r.verdict == "not covered"]
    listed = " ".join(r.configuration for r in records)
    for value in ("k1-rtg-loss step", "kl_penalty=k1-in-reward", "kl_loss_type=low_var_kl+ (= k3+)",
                  "kl_loss_type=abs", "kl_loss_type=mse (= k2)", "gae, lam=0.95", "grpo, norm_adv_by_std_in_grpo=False"):
        assert value in listed
    for mode in loss_agg_modes()[1:]:  # every value the installed verl accepts besides its default
        assert f"loss_agg_mode={mode}" in listed


def test_k1_rtg_loss_is_exact_on_and_off_policy_through_the_step(records):
    """Every k1-rtg-loss record comes from verl's whole step (dp 2, balancing, an engine/trainer mismatch with the
    engine's log-probs, dynamic batch sizes): exact."""
    cells = [r for r in records if r.mode == "k1-rtg-loss"]
    assert len(cells) == 2 * 2
    for record in cells:
        assert record.spec.get("step") is True, record.configuration
        assert record.verdict == "exact" and record.rel_err < ENUMERATION_REL and record.fix is None, record.configuration
        assert record.norm_ratio == pytest.approx(1.0, abs=ENUMERATION_REL)


def test_k1_in_reward_is_exact_on_policy_for_every_estimator_and_says_so_off_policy(records):
    cells = [r for r in records if r.mode == "k1-in-reward" and not r.spec.get("step")]
    assert len(cells) == 2 * (6 + OTHER_AGG_MODES)  # every estimator, grpo x every non-default loss_agg_mode
    for record in cells:
        length_weighted = "seq-mean-token-mean" in record.configuration
        if record.policy == "on":
            assert (record.verdict == "biased") == length_weighted, record.configuration
            if length_weighted:
                assert "loss_agg_mode=seq-mean-token-sum" in record.fix
        else:
            assert record.verdict == "biased"
            assert "exact on-policy only" in record.reason and "k1-rtg-loss" in record.reason
            assert record.fix == ("actor_rollout_ref.actor.use_kl_loss=True actor_rollout_ref.actor.kl_loss_type="
                                  "k1-rtg-loss algorithm.use_kl_in_reward=False")


EXACT_VERL_CELLS_ON_POLICY = {
    "algorithm.kl_penalty=kl, grpo, norm_adv_by_std_in_grpo=False",
    "algorithm.kl_penalty=kl, rloo",
    *[f"algorithm.kl_penalty=kl, rloo, loss_agg_mode={mode}" for mode in loss_agg_modes()
      if mode in ("token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm")],
}


def test_verls_own_configurations(records):
    """verl's cells: exact exactly where the taxonomy says (k1 in reward with a sample-independent baseline and
    a batch-constant loss), biased elsewhere, all biased on a stale batch; the fix is a kl-patches value."""
    verl = [r for r in records if r.mode == "library"]
    # 8 kl_loss_type cells, 10 reward cells (kl / low_var_kl x 5 estimators), low_var_kl and rloo x each other mode
    assert len(verl) == 2 * (18 + 2 * OTHER_AGG_MODES)
    for record in verl:
        exact = record.policy == "on" and record.configuration in EXACT_VERL_CELLS_ON_POLICY
        assert (record.verdict == "exact") == exact, (record.configuration, record.policy, record.rel_err)
        if not exact:
            assert record.rel_err > 1e-2 and ("k1-rtg-loss" in record.fix or "k1-in-reward" in record.fix
                                               or "loss_agg_mode=seq-mean-token-sum" in record.fix)
    k3 = by_name(records, "actor.kl_loss_type=low_var_kl (= k3)", "on")
    assert "forward-KL" in k3.reason and k3.fix == "actor_rollout_ref.actor.kl_loss_type=k1-rtg-loss"
    grpo = by_name(records, "algorithm.kl_penalty=kl, grpo", "on")
    assert "group std" in grpo.reason and grpo.fix.startswith("algorithm.kl_penalty=k1-in-reward")
    k1_loss = by_name(records, "actor.kl_loss_type=kl (= k1)", "on")
    assert k1_loss.norm_ratio < ENUMERATION_REL  # E[sum_t g_t] = 0


#: verl's cell -> the core reference cell that states the same configuration in plain torch. (Not RLOO with
#: seq-mean-token-mean: under 1/|y_i| weights a baseline no longer averages out, so RLOO's differs from none.)
CORE_EQUIVALENT = {
    "actor.kl_loss_type=kl (= k1)": "k1 in loss",
    "actor.kl_loss_type=mse (= k2)": "k2 in loss",
    "actor.kl_loss_type=low_var_kl (= k3)": "k3 in loss (GRPO default)",
    "actor.kl_loss_type=low_var_kl+ (= k3+)": "k3 value, k2 gradient (straight-through)",
    "actor.kl_loss_type=low_var_kl, loss_agg_mode=seq-mean-token-mean": "k3 in loss, seq-mean-token-mean",
    "algorithm.kl_penalty=kl, rloo": "k1 in reward (sequence sum)",
    "algorithm.kl_penalty=low_var_kl, rloo": "k3 in reward",
    "algorithm.kl_penalty=k1-in-reward, grpo": "k1-in-reward (kl-patches)",
}


@pytest.mark.parametrize("configuration", sorted(CORE_EQUIVALENT))
def test_verls_code_and_the_core_reference_give_the_same_expected_gradient(configuration):
    """On-policy (verl's PPO clip is inactive there; off-policy it clips and the core does not), the expected
    gradient of verl's loss over its declared scale equals the core reference's, coordinate by coordinate;
    k1-rtg-loss has no clip, so off-policy too."""
    from kl_patches.integrations.verl.audit import ProblemContext, cell_loss, declared_scale, default_cells

    cell = next(c for c in default_cells() if c.configuration == configuration)
    core = next(c for c in reference.CELLS if c.configuration == CORE_EQUIVALENT[configuration])
    regimes = (False, True) if cell.mode == "k1-rtg-loss" else (False,)
    for off_policy in regimes:
        ctx = ProblemContext.build(SPEC, off_policy)
        ours = expected_gradient(ctx.problem, cell_loss(cell.settings, ctx, cell.group_size), cell.group_size)
        theirs = expected_gradient(ctx.problem, core.loss, cell.group_size)
        scale = declared_scale(cell.settings, cell.group_size, ctx)
        torch.testing.assert_close(ours.gradient / scale, theirs.gradient, **LIBRARY_GRADIENT)


@pytest.mark.parametrize("configuration", [
    "algorithm.kl_penalty=kl, grpo",
    "algorithm.kl_penalty=low_var_kl, gae, lam=0.95",
    "algorithm.kl_penalty=k1-in-reward, reinforce_plus_plus",
])
def test_computing_each_set_of_responses_once_equals_per_group(configuration):
    """The audit computes a group and its permutations once: verl's group computations ignore row order."""
    from kl_patches.integrations.verl.audit import ProblemContext, cell_loss, default_cells

    cell = next(c for c in default_cells() if c.configuration == configuration)
    ctx = ProblemContext.build(SPEC, off_policy=True)
    cached = expected_gradient(ctx.problem, cell_loss(cell.settings, ctx, cell.group_size), cell.group_size)
    full = expected_gradient(ctx.problem, cell_loss(cell.settings, ctx, cell.group_size, grouping=per_group),
                             cell.group_size)
    torch.testing.assert_close(cached.gradient, full.gradient, **LIBRARY_PARITY)


def test_gae_is_biased_only_by_verls_batch_whitening(monkeypatch):
    """With verl's masked_whiten made the identity, k1 in the reward through verl's GAE with the audit's perfect
    critic is exact for lam=1 and lam<1; with a zero critic lam<1 is biased (the critic is what makes it exact)."""
    import verl.utils.torch_functional as verl_F

    from kl_patches.integrations.verl.audit import KLSettings, ProblemContext, Cell, run_cell

    monkeypatch.setattr(verl_F, "masked_whiten", lambda values, mask, shift_mean=True: values)
    ctx = ProblemContext.build(SPEC, off_policy=False)
    for lam in (1.0, 0.95, 0.5):
        settings = KLSettings(use_kl_in_reward=True, kl_penalty="kl", kl_coef=1.0, adv_estimator="gae", lam=lam)
        record = run_cell(Cell(f"gae {lam}", settings, "k1", "reward", "", "", group_size=2), ctx, "0.9.1")
        assert record.verdict == "exact", (lam, record.rel_err)
    settings = KLSettings(use_kl_in_reward=True, kl_penalty="kl", kl_coef=1.0, adv_estimator="gae", lam=0.5)
    ctx.critics[(True, "kl", 1.0, 1.0)] = torch.zeros_like(ctx.critic(settings))
    record = run_cell(Cell("gae zero critic", settings, "k1", "reward", "", "", group_size=2), ctx, "0.9.1")
    assert record.verdict == "biased" and record.rel_err > 1e-2


# ------------------------------------------------------------------------------------- user configuration


def user_audit(args=(), config=None, spec=None):
    from kl_patches.integrations.verl.audit import audit

    records = audit(spec or SPEC, config=config, args=list(args))
    assert len(records) == 2 and all(r.user_config for r in records)
    return {r.policy: r for r in records}


STEP_SPEC = PolicySpec(vocab=3, horizon=2)  # the step audit enumerates every ordered batch: a small policy


def engine_logp_by_default() -> bool:
    """verl 0.9's rollout.calculate_log_probs defaults to True, verl 0.8's to False."""
    from kl_patches.integrations.verl.audit import load_user_config

    return bool(load_user_config(None, []).actor_rollout_ref.rollout.calculate_log_probs)


def test_user_overrides_low_var_kl_are_biased_and_the_fix_makes_them_exact():
    args = ["actor_rollout_ref.actor.kl_loss_type=low_var_kl", "actor_rollout_ref.actor.use_kl_loss=true"]
    got = user_audit(args)
    # where verl's default leaves mu to the trainer's recomputation (0.8), the fix also asks for the engine's
    fix = "actor_rollout_ref.actor.kl_loss_type=k1-rtg-loss" + (
        "" if engine_logp_by_default() else " actor_rollout_ref.rollout.calculate_log_probs=True")
    for record in got.values():
        assert record.verdict == "biased" and record.fix == fix
        assert record.configuration.startswith("your configuration: actor.kl_loss_type=low_var_kl")
    fixed = user_audit(args + got["on"].fix.split())
    assert all(r.verdict == "exact" for r in fixed.values())


def test_user_grpo_kl_in_reward_fixes_on_and_off_policy():
    # one mini-batch per step (verl's defaults, 1024 / 256, make four: stale, where k1-in-reward is refused)
    args = ["algorithm.use_kl_in_reward=true", "algorithm.adv_estimator=grpo", "data.train_batch_size=256"]
    got = user_audit(args, spec=STEP_SPEC)
    assert got["on"].verdict == "biased"
    assert got["on"].fix == "algorithm.kl_penalty=k1-in-reward actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum"
    on_fixed = user_audit(args + got["on"].fix.split(), spec=STEP_SPEC)
    assert on_fixed["on"].verdict == "exact" and on_fixed["off"].verdict == "biased"
    assert on_fixed["on"].spec["step"] is True
    assert "exact on-policy only" in on_fixed["off"].reason
    off_fixed = user_audit(args + on_fixed["off"].fix.split(), spec=STEP_SPEC)
    assert all(r.verdict == "exact" for r in off_fixed.values())


def test_user_stale_kl_in_reward_is_pointed_to_k1_rtg_loss_and_refused_with_k1_in_reward():
    args = ["algorithm.use_kl_in_reward=true", "algorithm.adv_estimator=grpo", "actor_rollout_ref.actor.ppo_epochs=2"]
    got = user_audit(args)
    assert any("ppo_epochs=2" in note for note in got["on"].notes)
    assert "kl_loss_type=k1-rtg-loss" in got["on"].fix
    with pytest.raises(KLModeError, match="stale mini-batches.*k1-rtg-loss"):
        user_audit(args + ["algorithm.kl_penalty=k1-in-reward"])
    fixed = user_audit(args + got["on"].fix.split(), spec=STEP_SPEC)
    assert all(r.verdict == "exact" for r in fixed.values())


def test_user_config_with_both_kl_paths_applies_both_terms():
    args = ["actor_rollout_ref.actor.use_kl_loss=true", "actor_rollout_ref.actor.kl_loss_type=k1-rtg-loss",
            "actor_rollout_ref.actor.kl_loss_coef=0.2", "algorithm.use_kl_in_reward=true",
            "algorithm.kl_penalty=k1-in-reward", "algorithm.kl_ctrl.kl_coef=0.3", "algorithm.adv_estimator=rloo",
            "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum", "data.train_batch_size=256",
            "actor_rollout_ref.rollout.calculate_log_probs=True"]  # verl 0.8's default is False
    got = user_audit(args, spec=STEP_SPEC)
    assert got["on"].verdict == "exact" and got["on"].placement == "reward+loss"
    assert got["off"].verdict == "biased"  # the reward-side term is on-policy only


def test_user_yaml_configs_dumped_and_hydra_style(tmp_path):
    from kl_patches.integrations.verl.audit import load_user_config, verl_config_dir

    dumped = load_user_config()
    dumped.actor_rollout_ref.actor.use_kl_loss = True
    dumped.actor_rollout_ref.actor.kl_loss_type = "k3+"
    dumped.actor_rollout_ref.rollout.calculate_log_probs = True  # verl 0.8's default is False (mu: see test_step)
    OmegaConf.save(dumped, tmp_path / "dumped.yaml")
    got = user_audit(config=str(tmp_path / "dumped.yaml"))
    assert got["on"].verdict == "biased" and "kl_loss_type=k3+" in got["on"].configuration
    got = user_audit(["actor_rollout_ref.actor.kl_loss_type=k1-rtg-loss"], config=str(tmp_path / "dumped.yaml"),
                     spec=STEP_SPEC)
    assert all(r.verdict == "exact" and r.spec["step"] for r in got.values())
    (tmp_path / "recipe.yaml").write_text(
        "defaults:\n  - ppo_trainer\n  - _self_\nactor_rollout_ref:\n  actor:\n    use_kl_loss: true\n"
        "    kl_loss_type: k1-rtg-loss\n  rollout:\n    calculate_log_probs: true\n")
    assert os.path.isdir(verl_config_dir())
    got = user_audit(config=str(tmp_path / "recipe.yaml"), spec=STEP_SPEC)
    assert all(r.verdict == "exact" for r in got.values())


def test_user_config_errors():
    from kl_patches.integrations.verl.audit import audit

    with pytest.raises(KLModeError, match="use_kl_loss=True"):
        audit(SPEC, args=["actor_rollout_ref.actor.kl_loss_type=k1-rtg-loss"])
    with pytest.raises(Exception, match="nonexistent"):
        audit(SPEC, args=["actor_rollout_ref.actor.nonexistent=1"])
    with pytest.raises(ValueError, match="no such file"):
        audit(SPEC, config="/nonexistent/ppo.yaml")
    got = user_audit(["actor_rollout_ref.actor.kl_loss_coef=0.5"])  # no KL term on at all
    assert got["on"].verdict == "not covered" and "no KL term" in got["on"].reason


def run_cli(*argv):
    env = {**os.environ}
    return subprocess.run([sys.executable, "-m", "kl_patches", *argv], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=300)


def test_cli_exits_non_zero_for_a_biased_configuration_and_prints_the_override():
    result = run_cli("check", "--library", "verl", "--", "actor_rollout_ref.actor.use_kl_loss=true")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Fix: actor_rollout_ref.actor.kl_loss_type=k1-rtg-loss" in result.stdout
    result = run_cli("check", "--library", "verl", "--vocab", "3", "--horizon", "2", "--json", "--",
                     "actor_rollout_ref.actor.use_kl_loss=true",
                     "actor_rollout_ref.actor.kl_loss_type=k1-rtg-loss",
                     "actor_rollout_ref.rollout.calculate_log_probs=True")  # verl 0.8's default is False
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)
    assert [r["verdict"] for r in rows] == ["exact", "exact"] and all(r["library"] == "verl" for r in rows)


def test_unsupported_verl_version_audits_verls_own_cells_and_refuses_the_kl_patches_ones(monkeypatch, patched):
    import kl_patches.patching
    from kl_patches.integrations.verl.audit import audit
    from kl_patches.patching import PatchError

    patched.disable()
    monkeypatch.setattr(kl_patches.patching, "installed_version", lambda name: "0.10.0")
    try:
        records = audit(PolicySpec(vocab=2, horizon=2))
        ours = [r for r in records if r.mode != "library"]
        theirs = [r for r in records if r.mode == "library"]
        assert ours and all(r.verdict == "not covered" and "verl 0.10.0 is not supported" in r.reason for r in ours)
        assert theirs and all(r.verdict in ("exact", "biased") for r in theirs)
        with pytest.raises(PatchError, match="verl 0.10.0"):
            audit(SPEC, args=["actor_rollout_ref.actor.use_kl_loss=true",
                              "actor_rollout_ref.actor.kl_loss_type=k1-rtg-loss"])
    finally:
        monkeypatch.undo()
        patched.enable("library")
