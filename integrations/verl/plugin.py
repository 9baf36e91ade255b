"""The ``verl.plugins`` entry point (declared in kl-patches' pyproject.toml).

verl 0.9 imports every module of this entry-point group at the end of ``import verl`` (``verl/__init__.py``,
policy ``VERL_USE_EXTERNAL_PLUGINS``: ``auto`` by default), in every process that imports verl: the driver,
the ``TaskRunner`` actor and each worker actor. Importing this module registers kl-patches' post-import hooks;
it imports no verl submodule itself (``import verl`` is still running).
"""

from kl_patches.integrations.verl import install_plugin

install_plugin()
