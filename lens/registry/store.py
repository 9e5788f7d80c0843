"""The model registry: versioned model packages and movable aliases on a local directory or an ``s3://`` prefix.

Layout under the registry root (``.../models``)::

    <name>/<version>/               a model package (lens-package.json last, SHA-256 of every file); never changed
    <name>/aliases/<alias>.json     {"version", "previous": [...], "set_at", "by", "why"}; replaced atomically
    <name>/history/<time>-<id>.json one file per change (append-only: nothing is ever rewritten)
    <name>/rollout.json             the live traffic split: canary version, weight, shadow share, plan, step

Aliases are pointers like an index's ``CURRENT``: a reader sees the old pointer or the new one, never a mix. The
``stable`` pointer keeps the versions it pointed at before (``previous``), so :meth:`Registry.rollback` returns to
the last stable version without reading history.

Concurrent writers never lose each other's work, locally and on S3: a push claims its version number with a
create-only write (``<name>/<version>/_claim``: ``If-None-Match: *`` on S3, a hard link locally) and takes the next
number if another push claimed it; aliases and the rollout state are read-modify-written by compare-and-swap
(``If-Match`` on the ETag; a file lock locally), retried on conflict; history files have unique names. Serving resolves an alias to a version, opens that version's
package (every checksum verified) and records ``name@version`` in everything it writes.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from lens.errors import LensError
from lens.package import MANIFEST, Package, open_package
from lens.storage import Location

__all__ = ["Registry", "RegistryError", "VersionRef", "STABLE", "CANARY", "parse_model_ref", "default_registry"]

STABLE = "stable"
CANARY = "canary"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RESERVED = {"aliases", "history", "rollout.json"}
_CLAIM = "_claim"  # <name>/<version>/_claim: the create-only marker a push takes before writing (never listed)
_KEEP_PREVIOUS = 20


class RegistryError(LensError):
    code = "registry"
    http_status = 400


@dataclass(frozen=True)
class VersionRef:
    """One resolved version: ``name@version`` and where its package lives."""

    name: str
    version: str
    uri: str
    sha256: str  # digest of the package manifest (which names every file's digest)
    manifest: dict = field(default_factory=dict, compare=False, repr=False)  # as read when resolved (unverified)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


def parse_model_ref(ref: str) -> tuple[str, str]:
    """``NAME`` (its stable alias) or ``NAME@ALIAS_OR_VERSION`` -> (name, ref)."""
    name, _, at = str(ref).partition("@")
    _check_name(name, "model name")
    at = at or STABLE
    _check_name(at, "version or alias")
    return name, at


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value) or value in _RESERVED:
        raise RegistryError(f"{what} must match {_NAME.pattern} (and not be one of {sorted(_RESERVED)}), "
                            f"got {value!r}")
    return value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


class Registry:
    """Versions, aliases, history and the rollout state of named models under one root."""

    def __init__(self, root: str) -> None:
        try:
            self.loc = Location.parse(root)
        except ValueError as e:
            raise RegistryError(str(e)) from None
        self.root = str(root)

    def __repr__(self) -> str:
        return f"Registry({self.root!r})"

    # -- reading -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        seen = set()
        for f in self.loc.list_files():
            parts = self.loc.relative(f).split("/")
            if len(parts) == 3 and parts[2] == MANIFEST:
                seen.add(parts[0])
        return sorted(seen)

    def versions(self, name: str) -> list[str]:
        """Versions of ``name``, oldest first (by push time)."""
        _check_name(name, "model name")
        found = []
        for f in self.loc.list_files(self.loc.path(name)):
            parts = self.loc.relative(f).split("/")
            if len(parts) == 3 and parts[2] == MANIFEST and parts[1] not in _RESERVED:
                m = self.loc.read_json(f) or {}
                found.append((m.get("registry", {}).get("pushed_at", ""), parts[1]))
        return [v for _, v in sorted(found)]

    def aliases(self, name: str) -> dict[str, dict]:
        _check_name(name, "model name")
        out = {}
        for f in self.loc.list_files(self.loc.path(name, "aliases"), "*.json"):
            ptr = self.loc.read_json(f)
            if ptr:
                out[f.rsplit("/", 1)[1][:-5]] = ptr
        return out

    def alias(self, name: str, alias: str) -> dict | None:
        return self.loc.read_json(self.loc.path(_check_name(name, "model name"), "aliases",
                                                f"{_check_name(alias, 'alias')}.json"))

    def manifest(self, name: str, version: str) -> dict:
        m = self.loc.read_json(self.loc.path(_check_name(name, "model name"), _check_name(version, "version"),
                                             MANIFEST))
        if m is None:
            known = ", ".join(self.versions(name)) or "none"
            raise RegistryError(f"{name} has no version {version!r} in {self.root} (versions: {known})",
                                code="unknown_version", status=404)
        return m

    def resolve(self, name: str, ref: str = STABLE) -> VersionRef:
        """An alias or a version of ``name`` -> the version it names (an alias wins over a same-named version)."""
        _check_name(name, "model name")
        ptr = self.alias(name, ref) if _NAME.match(ref) else None
        version = ptr["version"] if ptr else ref
        m = self.manifest(name, version)
        digest = hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()
        return VersionRef(name, version, self.loc.uri_of(self.loc.path(name, version)), digest, m)

    def open(self, name: str, ref: str = STABLE, *, cache_dir=None) -> tuple[VersionRef, Package]:
        """Resolve and open a version, every checksum verified (:class:`PackageError` names a bad file)."""
        vref = self.resolve(name, ref)
        return vref, open_package(vref.uri, cache_dir=cache_dir)

    def verify(self, name: str, version: str, *, cache_dir=None) -> dict:
        """Re-check every file of a version against its manifest; a report, or :class:`PackageError`."""
        t0 = time.perf_counter()
        vref, pkg = self.open(name, version, cache_dir=cache_dir)
        return {"model": name, "version": vref.version, "uri": vref.uri, "files": len(pkg.manifest["files"]),
                "sha256": vref.sha256, "ok": True, "seconds": round(time.perf_counter() - t0, 3)}

    def history(self, name: str) -> list[dict]:
        _check_name(name, "model name")
        return [self.loc.read_json(f) for f in self.loc.list_files(self.loc.path(name, "history"), "*.json")]

    def rollout(self, name: str) -> dict | None:
        return self.loc.read_json(self.loc.path(_check_name(name, "model name"), "rollout.json"))

    # -- writing -----------------------------------------------------------------------------
    def _record(self, name: str, action: str, *, by: str | None, why: str | None, **details) -> dict:
        event = {"at": _now(), "action": action, "by": by or _who(), "why": why or ""} | details
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        self.loc.write_json(self.loc.path(name, "history", f"{stamp}-{uuid.uuid4().hex[:8]}.json"), event)
        return event

    def push(self, package_uri: str, *, name: str | None = None, version: str | None = None,
             by: str | None = None, why: str | None = None, cache_dir=None) -> VersionRef:
        """Copy a verified package in as a new, immutable version (``v1``, ``v2``... unless ``version``). The
        version is claimed first with a create-only write, so concurrent pushes each get their own."""
        pkg = open_package(package_uri, cache_dir=cache_dir)  # refuses a corrupt package before anything is copied
        name = _check_name(name or pkg.name, "model name")
        existing = self.versions(name)
        claim = json.dumps({"by": by or _who(), "at": _now(), "source": str(package_uri)}).encode()
        if version is not None:
            _check_name(version, "version")
            if version in existing or not self.loc.create_only(self.loc.path(name, version, _CLAIM), claim):
                raise RegistryError(f"{name}@{version} already exists; versions are immutable (push a new one)",
                                    code="version_exists", status=409)
        else:
            n = max((int(v[1:]) for v in existing if re.fullmatch(r"v\d+", v)), default=0) + 1
            while not self.loc.create_only(self.loc.path(name, f"v{n}", _CLAIM), claim):
                n += 1  # another push claimed it first: the next number
            version = f"v{n}"
        dest = self.loc.path(name, version)
        for fname in pkg.manifest["files"]:  # files first, the manifest last: a reader never sees a partial version
            self.loc.write_bytes(self.loc.path(name, version, fname), pkg.file(fname).read_bytes())
        manifest = dict(pkg.manifest, registry={"name": name, "version": version, "pushed_at": _now(),
                                                "pushed_by": by or _who(), "source": str(package_uri)})
        self.loc.write_bytes(self.loc.path(name, version, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())
        self._record(name, "push", by=by, why=why, version=version, kind=pkg.kind, source=str(package_uri))
        vref = self.resolve(name, version)
        assert vref.uri == self.loc.uri_of(dest)
        return vref

    def set_alias(self, name: str, alias: str, version: str, *, by: str | None = None, why: str | None = None,
                  action: str = "alias", cache_dir=None) -> dict:
        """Point ``alias`` at ``version``, which must exist and pass verification (every file against its
        checksum); the pointer keeps where it pointed before (``previous``). Compare-and-swap: concurrent sets
        each land, none loses another's ``previous``."""
        _check_name(alias, "alias")
        self.verify(name, version, cache_dir=cache_dir)  # refuses a missing or corrupted version (PackageError)
        ptr = {"version": version, "set_at": _now(), "by": by or _who(), "why": why or ""}

        def change(old: dict | None) -> dict:
            previous = ([old["version"]] + list(old.get("previous", [])) if old and old["version"] != version
                        else list(old.get("previous", [])) if old else [])
            return ptr | {"previous": previous[:_KEEP_PREVIOUS]}

        old, new = self.loc.update_json(self._alias_path(name, alias), change)
        self._record(name, action, by=by, why=why, alias=alias, version=version,
                     was=old["version"] if old else None)
        return new

    def _alias_path(self, name: str, alias: str) -> str:
        return self.loc.path(_check_name(name, "model name"), "aliases", f"{_check_name(alias, 'alias')}.json")

    def clear_alias(self, name: str, alias: str, *, by: str | None = None, why: str | None = None) -> None:
        old = self.alias(name, alias)
        if old is None:
            return
        self.loc.delete_file(self._alias_path(name, alias))
        self._record(name, "alias_cleared", by=by, why=why, alias=alias, was=old["version"])

    def promote(self, name: str, version: str | None = None, *, by: str | None = None,
                why: str | None = None) -> dict:
        """``stable`` := ``version`` (default: the canary's); the canary alias and any rollout end."""
        if version is None:
            canary = self.alias(name, CANARY)
            if canary is None:
                raise RegistryError(f"{name} has no canary to promote; give a version", code="no_canary")
            version = canary["version"]
        ptr = self.set_alias(name, STABLE, version, by=by, why=why, action="promote")
        self.clear_alias(name, CANARY, by=by, why=f"promoted to stable: {why or ''}".strip())
        self.end_rollout(name, "promoted", by=by, why=why)
        return ptr

    def rollback(self, name: str, *, by: str | None = None, why: str | None = None) -> dict:
        """Drop the canary (if any) and, when no canary was live, return ``stable`` to its previous version."""
        canary = self.alias(name, CANARY)
        state = self.rollout(name)
        if canary is not None or (state and state.get("status") == "running"):
            self.clear_alias(name, CANARY, by=by, why=why)
            self.end_rollout(name, "rolled_back", by=by, why=why)
            return self.alias(name, STABLE) or {}
        def change(stable: dict | None) -> dict:
            if not stable or not stable.get("previous"):
                raise RegistryError(f"{name}: nothing to roll back to (no canary, and stable has no previous "
                                    "version)", code="nothing_to_roll_back", status=409)
            return {"version": stable["previous"][0], "previous": stable["previous"][1:], "set_at": _now(),
                    "by": by or _who(), "why": why or ""}

        stable, ptr = self.loc.update_json(self._alias_path(name, STABLE), change)
        self._record(name, "rollback", by=by, why=why, alias=STABLE, version=ptr["version"], was=stable["version"])
        return ptr

    # -- the live traffic split --------------------------------------------------------------
    def start_rollout(self, name: str, version: str, *, steps: tuple[float, ...] = (5, 25, 50, 100),
                      bake_s: float = 300.0, shadow: float = 0.0, weight: float | None = None,
                      by: str | None = None, why: str | None = None) -> dict:
        """Make ``version`` the canary and start a rollout: ``steps`` (percent of traffic, the last one 100 for an
        automatic promotion) each held ``bake_s``; ``shadow`` mirrors that share of traffic to the other version.
        ``steps=()`` with a fixed ``weight`` is a manual canary (no automatic steps; rollbacks stay automatic)."""
        if any(not 0 <= s <= 100 for s in steps) or list(steps) != sorted(steps):
            raise RegistryError(f"rollout steps must rise within 0..100, got {list(steps)}")
        if not 0 <= shadow <= 1:
            raise RegistryError(f"shadow share must be in 0..1, got {shadow}")
        first = float(steps[0]) if steps else float(weight or 0.0)
        if not 0 <= first <= 100:
            raise RegistryError(f"canary weight must be in 0..100 percent, got {first}")
        stable = self.alias(name, STABLE)
        if stable is None:
            raise RegistryError(f"{name} has no stable version; set one first (lens models alias set {name} stable V)")
        if stable["version"] == version:
            raise RegistryError(f"{name}@{version} is already stable")
        self.set_alias(name, CANARY, version, by=by, why=why, action="canary")
        state = {"canary": version, "stable": stable["version"], "weight": first, "shadow": float(shadow),
                 "steps": [float(s) for s in steps], "step": 0, "bake_s": float(bake_s), "status": "running",
                 "step_started": time.time(), "started_at": _now(), "by": by or _who(), "why": why or "",
                 "last_decision": None}
        self.loc.write_json(self.loc.path(name, "rollout.json"), state)
        self._record(name, "rollout_start", by=by, why=why, version=version, weight=first, shadow=shadow,
                     steps=list(steps), bake_s=bake_s)
        return state

    def update_rollout(self, name: str, state: dict, *, action: str, by: str | None = None,
                       why: str | None = None, **details) -> dict:
        self.loc.write_json(self.loc.path(name, "rollout.json"), state)
        self._record(name, action, by=by, why=why, **details)
        return state

    def end_rollout(self, name: str, status: str, *, by: str | None = None, why: str | None = None) -> None:
        def change(state: dict | None) -> dict | None:
            if not state or state.get("status") != "running":
                return None
            return dict(state, status=status, weight=0.0, shadow=0.0, ended_at=_now())

        _, state = self.loc.update_json(self.loc.path(_check_name(name, "model name"), "rollout.json"), change)
        if state is not None:
            self._record(name, f"rollout_{status}", by=by, why=why, version=state.get("canary"))

    def set_traffic(self, name: str, *, weight: float | None = None, shadow: float | None = None,
                    by: str | None = None, why: str | None = None) -> dict:
        """Change the live canary weight (percent) or shadow share of a running rollout."""
        state = self.rollout(name)
        if not state or state.get("status") != "running":
            raise RegistryError(f"{name} has no running rollout (lens models rollout start ...)", code="no_rollout")
        if weight is not None and not 0 <= weight <= 100:
            raise RegistryError(f"canary weight must be in 0..100 percent, got {weight}")
        if shadow is not None and not 0 <= shadow <= 1:
            raise RegistryError(f"shadow share must be in 0..1, got {shadow}")
        state = dict(state, **({"weight": float(weight), "step_started": time.time()} if weight is not None else {}),
                     **({"shadow": float(shadow)} if shadow is not None else {}))
        return self.update_rollout(name, state, action="traffic", by=by, why=why, weight=state["weight"],
                                   shadow=state["shadow"])

    def routing(self, name: str) -> dict:
        """What serving needs, in one read of three small files: stable and canary versions, weight, shadow."""
        stable = self.alias(name, STABLE)
        if stable is None:
            raise RegistryError(f"{name} has no stable alias in {self.root} "
                                f"(lens models alias set {name} stable VERSION)", code="no_stable")
        canary = self.alias(name, CANARY)
        state = self.rollout(name) or {}
        running = state.get("status") == "running" and canary is not None and state.get("canary") == canary["version"]
        return {"stable": stable["version"], "canary": canary["version"] if canary else None,
                "weight": float(state.get("weight", 0.0)) if running else 0.0,
                "shadow": float(state.get("shadow", 0.0)) if running else 0.0}


def default_registry() -> str | None:
    """``$LENS_REGISTRY``: where ``lens models`` and pools find the registry when none is given."""
    return os.environ.get("LENS_REGISTRY") or None

