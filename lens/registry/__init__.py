"""The model registry: named, immutable versions of model packages and the aliases that point at them
(:mod:`.store`), and base models packaged from any weights Lens can load (:mod:`.modelpack`)."""
