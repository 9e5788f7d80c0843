"""The application layer: the ``lens`` command line (:mod:`.main`, one module per command family: :mod:`.batch`,
:mod:`.index`, :mod:`.train`, :mod:`.events`, :mod:`.registry`, :mod:`.drift`) and ``lens demo``
(:mod:`.demo`). The only code that imports every layer of Lens; nothing imports it."""
