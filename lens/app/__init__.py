"""The application layer: the ``lens`` command line and ``lens demo``. The only code that imports every part of
Lens (the runtime in ``lens``, ``batch``, ``index``, ``serve``); nothing imports it."""
