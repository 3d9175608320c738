"""Hook specifications: what a reaudio plugin may implement.

A plugin is any module named in the ``reaudio.plugins`` entry-point group, e.g. in the
plugin package's ``pyproject.toml``::

    [project.entry-points."reaudio.plugins"]
    my-encoder = "my_package.reaudio_plugin"

The module implements hooks decorated with :data:`reaudio_core.hookimpl`.
"""
import pluggy

hookspec = pluggy.HookspecMarker("reaudio")
hookimpl = pluggy.HookimplMarker("reaudio")


@hookspec
def register_components(register):
    """Register component classes.

    Call ``register(kind, name, cls, defaults=None, tiny=None)`` once per component:

    * ``kind``: one of ``retriever``, ``text_encoder``, ``audio_encoder``, ``denoiser``,
      ``decoder``, ``vocoder``, ``feature_model`` (the class must subclass the matching
      interface in :mod:`reaudio_core.interfaces`).
    * ``name``: the name YAML uses (``text_encoder: {name: NAME}``); unique per kind.
    * ``cls``: constructed as ``cls(**params)`` with keyword arguments only.
    * ``defaults``: default parameters for components not catalogued in the
      repository's ``registry.yaml`` (third-party plugins); built-in components state
      their defaults in ``registry.yaml`` only.
    * ``tiny``: parameters (overlaid on the defaults) that build an instance small and
      offline enough to test in seconds on a CPU; ``{}`` when the defaults already are.
      The contract tests (:mod:`reaudio_core.testing`, ``reaudio check-plugin``) build the
      component with them; a component without ``tiny`` cannot be checked.
    """
