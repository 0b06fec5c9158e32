# The Message base class and the registry of message kinds.
#
# Invariants:
# - A KIND names exactly one registered class for the life of the process (re-registering the same class, or a
#   reloaded class with the same module and qualified name, replaces it; anything else is a TypeError).
# - Registered classes are frozen, slotted dataclasses whose fields are all keyword-only.

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

MAX_KIND_LEN = 64
_KIND_RE = re.compile(r"[a-z][a-z0-9_.\-]*")


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Base of every wire message.

    Subclass it, set `KIND` (unique, lowercase, e.g. "dht.ping") and `VERSION`, and decorate with
    `@register_message` (which also applies `@dataclass(frozen=True, slots=True, kw_only=True)` if the class is
    not a dataclass yet). Field annotations are the schema; see _schema.py for the supported types and
    `wire_field` for per-field options. A message with tensor fields should say `eq=False` in its own
    `@dataclass(...)`, since comparing tensors with == does not give a bool.

    Class attributes:
        KIND: the name on the wire.
        VERSION: bump it when fields are added; a peer decoding a newer VERSION ignores fields it does not
            know, while at its own VERSION or older an unknown field is an error.
        ACCEPT_NEWER: set False to refuse messages whose VERSION is newer than this class's (for messages
            whose new fields change the meaning of old ones).
    """

    KIND: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    ACCEPT_NEWER: ClassVar[bool] = True


_REGISTRY: dict[str, type[Message]] = {}


def check_kind(kind: object) -> str:
    if not isinstance(kind, str) or len(kind) > MAX_KIND_LEN or not _KIND_RE.fullmatch(kind):
        raise TypeError(f"KIND must be a lowercase name of at most {MAX_KIND_LEN} characters, got {kind!r}")
    return kind


def add(cls: type[Message]) -> None:
    kind = check_kind(cls.KIND)
    old = _REGISTRY.get(kind)
    if old is not None and old is not cls and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"message kind {kind!r} is already registered by {old.__module__}.{old.__qualname__}")
    _REGISTRY[kind] = cls


def lookup(kind: str) -> type[Message] | None:
    return _REGISTRY.get(kind)


def registered_messages() -> Mapping[str, type[Message]]:
    """A read-only view of KIND -> class for every registered message."""
    return MappingProxyType(_REGISTRY)
