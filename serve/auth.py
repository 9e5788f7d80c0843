"""Optional API keys for the HTTP API, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from lens.errors import ConfigError

__all__ = ["ApiKeys"]


class ApiKeys:
    """Keys from an environment variable (comma-separated) and/or a file (one per line).

    No keys configured means auth is off. Keys are kept only as SHA-256 digests and
    every presented key is compared against all of them with ``hmac.compare_digest``,
    so timing reveals neither which key matched nor how much of one did.
    """

    def __init__(self, keys: list[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @classmethod
    def load(cls, env_var: str | None, file: str | None) -> "ApiKeys":
        keys: list[str] = []
        if env_var and os.environ.get(env_var):
            keys += [k.strip() for k in os.environ[env_var].split(",") if k.strip()]
        if file:
            try:
                text = Path(file).expanduser().read_text()
            except OSError as e:
                raise ConfigError(f"cannot read API keys file {file}: {e.strerror or e}") from e
            keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        if any(len(k) < 16 for k in keys):
            raise ConfigError("API keys must be at least 16 characters")
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, presented: str | None) -> bool:
        if not self._digests:
            return True
        if not presented:
            return False
        digest = hashlib.sha256(presented.encode()).digest()
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(d, digest)
        return ok
