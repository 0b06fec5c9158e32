"""Optional backend capabilities are `runtime_checkable` Protocols, checked before a server announces anything."""

from __future__ import annotations

from typing import Any

import pytest

from petalnode.errors import ConfigError
from petalnode.node import LoraCapableBackend, TorchBackend
from petalnode.node._node import _check_adapter_specs
from petalnode.transport import RelaySignaler, Signaler


class _NoLoraBackend:
    """The shape of the simulator's stand-in: compute methods, no `load_adapters`."""

    def model_info(self, model: str | None) -> Any: ...


def test_torch_backend_is_lora_capable() -> None:
    assert isinstance(TorchBackend(), LoraCapableBackend)
    _check_adapter_specs(("name=some/adapter",), TorchBackend())  # type: ignore[arg-type]


def test_a_backend_without_lora_is_refused_when_adapters_are_configured() -> None:
    assert not isinstance(_NoLoraBackend(), LoraCapableBackend)
    with pytest.raises(ConfigError, match="cannot load LoRA adapters"):
        _check_adapter_specs(("some/adapter",), _NoLoraBackend())  # type: ignore[arg-type]
    _check_adapter_specs((), _NoLoraBackend())  # type: ignore[arg-type]  # no adapters: nothing to check


class _PlainSignaler:
    async def ice_servers(self, address: Any) -> list[str]:
        return []

    async def exchange(self, address: Any, offer: Any) -> Any: ...


class _RelayingSignaler(_PlainSignaler):
    async def open_relay(self, address: Any) -> Any: ...


def test_only_a_signaler_with_open_relay_is_a_relay_signaler() -> None:
    assert isinstance(_PlainSignaler(), Signaler)
    assert not isinstance(_PlainSignaler(), RelaySignaler)
    assert isinstance(_RelayingSignaler(), RelaySignaler)
