"""Tenants: who holds which API key, which adapters each may use, and each one's limits.

The API-keys file (YAML; JSON is YAML) stores each key as the hex sha256 of the key, never in
clear (docs/design.md, "Tenants"):

    tenants:
      acme:
        keys_sha256: ["9f86d081..."]
        adapters: ["acme-*", "shared-summarizer"]   # names or fnmatch globs; "*" = everything
        requests_per_minute: 600                    # optional
        tokens_per_minute: 200000                   # optional
        max_concurrent: 16                          # optional

The base model is usable only when a tenant lists it by name or lists "*": a glob meant for
adapters ("acme-*") never grants the base by accident. A file with no tenants refuses every
key. Without a file the server is open: every caller is the one unlimited tenant `OPEN_TENANT`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_TENANT_FIELDS = {
    "keys_sha256", "adapters", "requests_per_minute", "tokens_per_minute", "max_concurrent"
}


class TenantFileError(ValueError):
    """The API-keys file is malformed; the message names the tenant and field."""


@dataclass(frozen=True)
class TenantLimits:
    """Per-tenant limits; None means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer")


@dataclass(frozen=True)
class Tenant:
    """One tenant: its adapter patterns and limits. Keys are not kept here."""

    name: str
    adapters: tuple[str, ...] = ()
    limits: TenantLimits = field(default_factory=TenantLimits)

    def may_use(self, model: str, base_name: str) -> bool:
        """Whether this tenant may send requests to `model` (an adapter or the base)."""
        if model == base_name:
            return any(p == "*" or p == base_name for p in self.adapters)
        return any(fnmatchcase(model, pattern) for pattern in self.adapters)


OPEN_TENANT = Tenant(name="open", adapters=("*",))


def hash_key(key: str) -> str:
    """The form keys are stored in: hex sha256 of the UTF-8 key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TenantTable:
    """Key hash -> tenant. `open` tables accept any caller (no keys file)."""

    entries: tuple[tuple[bytes, Tenant], ...] = ()
    open: bool = False

    @property
    def tenants(self) -> tuple[Tenant, ...]:
        seen: dict[str, Tenant] = {}
        for _, tenant in self.entries:
            seen.setdefault(tenant.name, tenant)
        return tuple(seen.values())

    def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant holding `key`, or None. Open tables return OPEN_TENANT for anyone.

        Compares the key's digest with every stored digest in constant time and without an
        early exit, so neither the time taken nor the position of a match says anything
        about the stored keys.
        """
        if self.open:
            return OPEN_TENANT
        if not key:
            return None
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found: Tenant | None = None
        for stored, tenant in self.entries:
            if hmac.compare_digest(stored, digest) and found is None:
                found = tenant
        return found


def open_table() -> TenantTable:
    return TenantTable(open=True)


def _int_or_none(tenant: str, name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TenantFileError(f"tenant {tenant!r}: {name} must be a positive integer")
    return value


def parse_tenants(data: Any) -> TenantTable:
    """Build the table from the parsed YAML document; raises TenantFileError."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise TenantFileError("the API-keys file must be a mapping with a 'tenants' key")
    unknown = set(data) - {"tenants"}
    if unknown:
        raise TenantFileError(f"unknown top-level keys {sorted(unknown)}; expected 'tenants'")
    tenants = data.get("tenants") or {}
    if not isinstance(tenants, Mapping):
        raise TenantFileError("'tenants' must map tenant names to their settings")
    entries: list[tuple[bytes, Tenant]] = []
    owners: dict[str, str] = {}
    for name, spec in tenants.items():
        name = str(name)
        if not isinstance(spec, Mapping):
            raise TenantFileError(f"tenant {name!r} must be a mapping")
        unknown = set(spec) - _TENANT_FIELDS
        if unknown:
            raise TenantFileError(
                f"tenant {name!r}: unknown fields {sorted(unknown)}; expected "
                f"{sorted(_TENANT_FIELDS)} (keys are stored as keys_sha256, never in clear)"
            )
        keys = spec.get("keys_sha256") or []
        if isinstance(keys, str) or not isinstance(keys, list):
            raise TenantFileError(f"tenant {name!r}: keys_sha256 must be a list")
        adapters = spec.get("adapters") or []
        if isinstance(adapters, str) or not isinstance(adapters, list) or not all(
            isinstance(a, str) and a for a in adapters
        ):
            raise TenantFileError(f"tenant {name!r}: adapters must be a list of names/patterns")
        limits = TenantLimits(
            requests_per_minute=_int_or_none(name, "requests_per_minute",
                                             spec.get("requests_per_minute")),
            tokens_per_minute=_int_or_none(name, "tokens_per_minute",
                                           spec.get("tokens_per_minute")),
            max_concurrent=_int_or_none(name, "max_concurrent", spec.get("max_concurrent")),
        )
        tenant = Tenant(name=name, adapters=tuple(adapters), limits=limits)
        for key in keys:
            text = str(key).strip().lower()
            if not _SHA256_HEX.match(text):
                raise TenantFileError(
                    f"tenant {name!r}: {str(key)[:8]}... is not a hex sha256; store "
                    "sha256(key), e.g. `printf %s KEY | sha256sum`"
                )
            if text in owners:
                raise TenantFileError(
                    f"a key of tenant {name!r} is also a key of tenant {owners[text]!r}"
                )
            owners[text] = name
            entries.append((bytes.fromhex(text), tenant))
    return TenantTable(entries=tuple(entries), open=False)


def load_tenants(path: Path | None) -> TenantTable:
    """The table of the file at `path`, or the open table when `path` is None."""
    if path is None:
        return open_table()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TenantFileError(f"cannot read the API-keys file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TenantFileError(f"{path} is not valid YAML: {exc}") from None
    try:
        return parse_tenants(data)
    except ValueError as exc:
        raise TenantFileError(f"{path}: {exc}") from None
