"""`RemoteBlockChain`: the synchronous `BlockChain` facade over the async `SwarmClient`.

transformers' `generate` is synchronous, so the client's event loop runs in a daemon thread and each call here
submits a coroutine to it and waits. Ctrl-C in the caller cancels the coroutine in flight.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import torch

from petalnode._timeouts import DEFAULT_TIMEOUTS
from petalnode.codecs import TensorCodec
from petalnode.compute import ModelInfo
from petalnode.errors import ClientTimeoutError, ClosedResourceError
from petalnode.identity import PeerAddress
from petalnode.node._swarm_client import SwarmClient, SwarmSession
from petalnode.node._swarm_view import SwarmView
from petalnode.node._verification import DEFAULT_VERIFY_MODE

T = TypeVar("T")
# The default of Timeouts.client_start; `connect` reads `timeouts.client_start` from its options.
CONNECT_TIMEOUT_S = DEFAULT_TIMEOUTS.client_start


class _LoopThread:
    """An event loop in a daemon thread; `run` submits a coroutine and waits for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="petalnode-client", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run `coro` on the loop thread and return its result.

        Raises:
            ClientTimeoutError: it took longer than `timeout_s` (it is cancelled).
        """
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            if future.done():  # the coroutine's own error, not our wait running out
                raise
            future.cancel()
            raise ClientTimeoutError(f"client operation took longer than {timeout_s} s") from None
        except KeyboardInterrupt:
            future.cancel()
            raise

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


class RemoteChainSession:
    """Synchronous view of a `SwarmSession` (implements `petalnode.client.ChainSession`)."""

    def __init__(self, loop: _LoopThread, session: SwarmSession) -> None:
        self._loop = loop
        self.session = session

    @property
    def position(self) -> int:
        return self.session.position

    @property
    def reroutes(self) -> int:
        return self.session.reroutes

    def step(self, hidden_states: torch.Tensor, *, start_position: int | None = None) -> torch.Tensor:
        return self._loop.run(self.session.step(hidden_states, start_position))

    def verify(self) -> None:
        """Check every position so far (raises `VerificationRollback` if returned outputs were wrong)."""
        self._loop.run(self.session.verify())

    def close(self) -> None:
        if not self.session.closed:
            with contextlib.suppress(Exception):
                self._loop.run(self.session.aclose(), timeout_s=10)


class RemoteBlockChain:
    """All blocks of a model, served by a swarm. Implements `petalnode.client.BlockChain`."""

    def __init__(self, client: SwarmClient, loop: _LoopThread) -> None:
        self.client = client
        self._loop = loop
        self._closed = False

    @classmethod
    def connect(
        cls,
        info: ModelInfo,
        *,
        bootstrap: Sequence[str | PeerAddress],
        dtype: torch.dtype = torch.float32,
        codec: TensorCodec | str = TensorCodec.RAW,
        **options: Any,
    ) -> RemoteBlockChain:
        """Join the swarm of `info`'s model as a client (options go to `SwarmClient`).

        `verify` defaults to "sample" here: a swarm reached through a bootstrap address is made of strangers'
        machines (pass verify="off" for servers you run yourself, "full" to check every step before it is used).
        """
        options.setdefault("verify", DEFAULT_VERIFY_MODE)
        if "referee" not in options and getattr(info.source, "path", None) is not None:
            from petalnode.node._referee import LocalReferee

            options["referee"] = LocalReferee(info, dtype=dtype)
        if "transport" not in options:
            # TCP and WebRTC: servers behind NAT announce webrtc:// addresses reached through their relay.
            from petalnode.identity import Identity
            from petalnode.node._signaling import NatOptions, Signaling
            from petalnode.swarm_key import load_swarm_key

            options = {**options, "swarm_key": load_swarm_key(options.get("swarm_key"))}
            signaling = Signaling(options.get("identity") or Identity.generate(), NatOptions(stun=False),
                                  swarm_key=options["swarm_key"])
            options = {**options, "identity": signaling.identity, "transport": signaling.transport()}
        loop = _LoopThread()
        client = SwarmClient(info.source.name, info.num_blocks, bootstrap, dtype=dtype, codec=TensorCodec(codec),
                             **options)
        try:
            loop.run(client.start(), timeout_s=client.timeouts.client_start)
        except BaseException:
            loop.close()
            raise
        return cls(client, loop)

    def open_session(
        self, max_length: int, *, batch_size: int = 1, adapter: str | None = None,
        prompts: torch.Tensor | None = None,
    ) -> RemoteChainSession:
        if self._closed:
            raise ClosedResourceError("the swarm client is closed")
        session = self.run(self.client.open_session(max_length, batch_size=batch_size, adapter=adapter,
                                                    prompts=prompts))
        return RemoteChainSession(self._loop, session)

    def forward(
        self, hidden_states: torch.Tensor, *, prompts: torch.Tensor | None = None, adapter: str | None = None,
    ) -> torch.Tensor:
        """Whole sequences through the swarm; differentiable in `hidden_states` and `prompts` (autograd)."""
        from petalnode.node._remote_autograd import RemoteChainFunction

        return RemoteChainFunction.apply(hidden_states, prompts, self, adapter)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the client's loop and wait for it."""
        if self._closed:
            raise ClosedResourceError("the swarm client is closed")
        return self._loop.run(coro)

    def swarm(self) -> SwarmView:
        return self._loop.run(self.client.swarm())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._loop.run(self.client.aclose(), timeout_s=10)
        self._loop.close()
