"""Re-embed stored rows from their source images and report the rows whose stored vector disagrees.

The check behind ``lens index verify``: it catches any corruption of stored embeddings (a row holding another
image's vector, a truncated write, a model or preprocessing drift) whatever caused it, by recomputing a sample
from the images themselves with the model, backend and precision the rows record
(:func:`lens.runtime.loading.config_for_identity`). Where the rows come from (an embeddings folder, an index) is the
caller's business: :mod:`lens.index.verify`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from lens.identity import ModelIdentity

__all__ = ["Row", "VerifyReport", "reembed_and_compare", "MIN_COSINE"]

logger = logging.getLogger(__name__)

#: A stored vector whose cosine to its re-embedding is below this disagrees (same model, backend and precision
#: agree to ~1e-6; another image's vector is far below: 0.13 and 0.21 in the OpenVINO report).
MIN_COSINE = 0.999


@dataclass
class Row:
    id: str
    vector: np.ndarray  # the stored (L2-normalised) embedding
    image: Callable[[], bytes]  # reads the source image; raises OSError (or any error) when it cannot


@dataclass
class VerifyReport:
    checked: int = 0
    disagree: list[dict] = field(default_factory=list)  # {id, cosine}, worst first
    unverifiable: list[dict] = field(default_factory=list)  # {id, reason}: the image could not be read or decoded
    min_cosine: float | None = None
    recorded: str = ""  # backend precision the rows record
    reembedded: str = ""  # backend precision this host re-embedded with

    @property
    def ok(self) -> bool:
        return not self.disagree

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checked": self.checked, "disagree": len(self.disagree),
                "unverifiable": len(self.unverifiable), "min_cosine": self.min_cosine,
                "threshold": MIN_COSINE, "recorded": self.recorded, "reembedded_with": self.reembedded,
                "rows_that_disagree": self.disagree, "rows_unverifiable": self.unverifiable}


def reembed_and_compare(identity: ModelIdentity, rows: Iterable[Row], *, batch_size: int = 16,
                        min_cosine: float = MIN_COSINE, log=None, **model_overrides) -> VerifyReport:
    """Re-embed each row's image with ``identity``'s model (its backend and precision where this host can run
    them) and compare with the stored vector."""
    from .loading import config_for_identity, served_line
    from .predictor import Predictor

    predictor = Predictor.from_config(config_for_identity(identity, **model_overrides))
    got = predictor.identity()
    diff = identity.mismatch(got)
    if diff:
        from lens.errors import ConfigError

        raise ConfigError(f"cannot re-embed: the rows were made with {identity.model} (weights "
                          f"{identity.weights_sha256[:12]}...), this host loads one that differs in {', '.join(diff)}; "
                          "pass the weights the rows were made with")
    report = VerifyReport(recorded=f"{identity.backend or '?'} {identity.precision}",
                          reembedded=f"{got.backend} {got.precision}")
    if log is not None:
        log(f"re-embedding with {got.model} on {served_line(predictor.model.served())}")
        if (identity.backend, identity.precision) != (got.backend, got.precision) and identity.backend:
            log(f"warning: the rows record {report.recorded}, this host runs {report.reembedded}: small differences "
                "are expected, another image's vector is not")
    cosines = []
    pending: list[tuple[Row, bytes]] = []

    def flush() -> None:
        for (row, _), res in zip(pending, predictor.predict([b for _, b in pending])):
            if not res.ok:
                report.unverifiable.append({"id": row.id, "reason": f"{res.code}: {res.message}"})
                continue
            stored = np.asarray(row.vector, np.float32)
            cos = float(stored @ res.embedding / max(float(np.linalg.norm(stored)), 1e-12))
            cosines.append(cos)
            report.checked += 1
            if not cos >= min_cosine:
                report.disagree.append({"id": row.id, "cosine": round(cos, 6)})
        pending.clear()

    for row in rows:
        try:
            data = row.image()
        except Exception as e:  # noqa: BLE001 - a missing or unreadable source is reported, not fatal
            report.unverifiable.append({"id": row.id, "reason": f"unreadable: {e}"})
            continue
        pending.append((row, data))
        if len(pending) >= batch_size:
            flush()
    flush()
    report.disagree.sort(key=lambda d: d["cosine"])
    report.min_cosine = round(min(cosines), 6) if cosines else None
    return report
