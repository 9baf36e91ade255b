"""``python -m kl_patches.integrations.openrlhf <train_ppo_ray args> --algo.kl.mode MODE``."""

from kl_patches.integrations.openrlhf.launcher import main

raise SystemExit(main())
