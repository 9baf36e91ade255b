"""How verl loads kl-patches in every process that imports verl (the driver, the ``TaskRunner`` actor and each
worker actor). Importing this module registers kl-patches' post-import hooks; it imports no verl submodule itself
(``import verl`` is still running).

* verl 0.9 imports every module of the ``verl.plugins`` entry-point group (declared in kl-patches' pyproject.toml)
  at the end of ``import verl`` (policy ``VERL_USE_EXTERNAL_PLUGINS``: ``auto`` by default): nothing to set.
* verl 0.8 has no entry-point discovery; it imports the modules named in ``VERL_USE_EXTERNAL_MODULES`` on
  ``import verl``: ``export VERL_USE_EXTERNAL_MODULES=kl_patches.integrations.verl.plugin`` before starting the
  run (Ray's workers inherit the driver's environment on a local cluster; on a multi-node cluster export it
  where ``ray start`` runs, or pass it in ``+ray_kwargs.ray_init.runtime_env.env_vars``).
"""

from kl_patches.integrations.verl import install_plugin

install_plugin()
