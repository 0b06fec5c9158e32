"""`Timeouts` (one object for every phase), `timeout_scope` (expiry becomes the phase's error, cancellation stays
cancellation) and the timeout branch of the exception tree."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import math
import re
from pathlib import Path

import pytest

import petalnode
from petalnode import DEFAULT_TIMEOUTS, Timeouts, errors
from petalnode._timeouts import timeout_scope
from petalnode.errors import (
    ConfigError,
    ConnectTimeoutError,
    DHTError,
    PetalnodeError,
    PetalnodeTimeoutError,
    RemoteError,
    RPCTimeoutError,
    StepTimeoutError,
    TransportError,
    error_from_code,
)

PACKAGE = Path(petalnode.__file__).parent


# ---- Timeouts ---------------------------------------------------------------------------------------------------

def test_defaults_are_the_values_the_old_constants_had() -> None:
    t = Timeouts()
    assert (t.connect, t.handshake, t.webrtc_handshake, t.keepalive, t.webrtc_keepalive) == (5.0, 5.0, 10.0, 20.0, 8.0)
    assert (t.rpc, t.first_message, t.heartbeat) == (30.0, 10.0, 5.0)
    assert (t.open, t.step, t.rtt_probe, t.wait_for_blocks, t.client_start) == (15.0, 60.0, 2.0, 60.0, 60.0)
    assert (t.dht_rpc, t.dht_lookup, t.dht_bootstrap, t.offline_announce) == (2.0, 20.0, 20.0, 3.0)
    assert DEFAULT_TIMEOUTS == t


def test_frozen_slotted_keyword_only_and_every_field_documented() -> None:
    t = Timeouts()
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.step = 1.0  # type: ignore[misc]
    assert not hasattr(t, "__dict__")
    with pytest.raises(TypeError):
        Timeouts(5.0)  # type: ignore[misc]
    source = (PACKAGE / "_timeouts.py").read_text()
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Timeouts")
    body = cls.body
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign):
            doc = body[i + 1]
            assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), node.target.id  # type: ignore[attr-defined]
            assert re.search(r"\bwas\s", doc.value.value), f"{node.target.id}: say where the default came from"  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, math.nan, "5", True])
def test_validation_raises_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="step"):
        Timeouts(step=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="connect"):
        DEFAULT_TIMEOUTS.replace(connect=bad)


def test_none_means_no_limit_and_replace_derives_a_variant() -> None:
    t = DEFAULT_TIMEOUTS.replace(step=0.5, open=None)
    assert t.step == 0.5 and t.open is None and t.rpc == DEFAULT_TIMEOUTS.rpc
    assert DEFAULT_TIMEOUTS.step == 60.0  # the original is unchanged
    with pytest.raises(ConfigError, match="unknown timeout"):
        DEFAULT_TIMEOUTS.replace(stepp=1.0)


# ---- timeout_scope ----------------------------------------------------------------------------------------------

def test_scope_turns_its_expiry_into_the_phase_error() -> None:
    async def main() -> None:
        with pytest.raises(StepTimeoutError, match="too slow") as info:
            async with timeout_scope(0.01, StepTimeoutError, "too slow"):
                await asyncio.sleep(10)
        assert not isinstance(info.value, TimeoutError)
        assert info.value.__cause__ is None and info.value.__suppress_context__

    asyncio.run(main())


def test_scope_without_expiry_passes_results_and_other_errors_through() -> None:
    async def main() -> None:
        async with timeout_scope(None, StepTimeoutError, "x") as scope:
            await asyncio.sleep(0)
        assert not scope.expired()
        # A builtin TimeoutError that is not this scope's expiry is not relabelled as a step timeout.
        with pytest.raises(TimeoutError) as info:
            async with timeout_scope(10, StepTimeoutError, "x"):
                raise TimeoutError("someone else's")
        assert not isinstance(info.value, PetalnodeError)

    asyncio.run(main())


def test_a_cancellation_is_not_turned_into_a_timeout() -> None:
    async def main() -> None:
        async def waiter() -> None:
            async with timeout_scope(10, StepTimeoutError, "x"):
                await asyncio.sleep(10)

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


# ---- the exception tree -----------------------------------------------------------------------------------------

def _timeout_classes() -> list[type]:
    return [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, BaseException)
            and "Timeout" in c.__name__]


def test_every_timeout_error_derives_from_the_one_base_and_not_from_the_builtin() -> None:
    classes = _timeout_classes()
    assert len(classes) >= 9
    for cls in classes:
        assert issubclass(cls, PetalnodeTimeoutError), cls
        assert not issubclass(cls, TimeoutError), cls  # the builtin is an OSError: `except OSError` would eat it
        assert cls.__name__ in errors.__doc__, f"{cls.__name__} missing from the tree in errors.py"


def test_timeouts_also_sit_under_their_layer() -> None:
    assert issubclass(ConnectTimeoutError, TransportError)
    assert issubclass(errors.HandshakeTimeoutError, ConnectTimeoutError)
    assert issubclass(errors.DHTTimeoutError, DHTError)
    assert issubclass(RPCTimeoutError, RemoteError) and RPCTimeoutError.code == "timeout"
    assert issubclass(StepTimeoutError, RPCTimeoutError) and issubclass(errors.OpenTimeoutError, RPCTimeoutError)
    assert type(error_from_code("timeout", "slow")) is RPCTimeoutError


def _raises_of_bare_petalnode_error() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id == "PetalnodeError":
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


def test_no_module_raises_bare_petalnode_error() -> None:
    assert _raises_of_bare_petalnode_error() == []
