"""The model runtime, importable without Ray: decode and preprocess images (:mod:`.decode`, :mod:`.preprocess`),
load a model on a backend (:mod:`.loading`, :mod:`.backends`, :mod:`.openvino`, the int8 gate
:mod:`.int8_gate`), and run it (:mod:`.predictor`, custom-tag heads :mod:`.heads`). Its typed configs are
:mod:`.config`; which models and weights exist, :mod:`.models` and :mod:`.weights`."""
