"""Model-quality monitoring: embedding and prediction drift against a reference profile (:mod:`.drift`) and
labelled feedback from users (:mod:`.feedback`)."""
