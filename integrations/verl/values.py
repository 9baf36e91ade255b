"""Backwards-compatible name of :mod:`kl_patches.integrations.verl.config` (the driver-side checks)."""

from kl_patches.integrations.verl.config import *  # noqa: F401,F403
from kl_patches.integrations.verl.config import check_loss_side, check_reward_side, check_trainer_config, lookup  # noqa: F401
