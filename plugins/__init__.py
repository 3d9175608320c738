"""Built-in reaudio plugins (import name ``reaudio_plugins``).

Each module here is one entry point of the ``reaudio.plugins`` group in pyproject.toml,
registered exactly as a third-party plugin would be. Heavy dependencies are imported
inside the components, so listing plugins stays fast.
"""
