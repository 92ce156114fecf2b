"""First-party solver adapters.

Each module is one backend and is registered under the ``ffo`` entry-point group in
``pyproject.toml``, exactly as a third-party plugin would be; nothing here is imported by
``ffo_core``.  Adapters import their solver package lazily (inside ``solve``), never torch.
"""
