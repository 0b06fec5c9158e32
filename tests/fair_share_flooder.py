"""A flooding client for the fair-share tests and benchmark: one peer id grabbing sessions and stepping flat out.

Run as a separate process: `python -m tests.fair_share_flooder --server ADDR --hidden N [...]`. It opens up to
`--sessions` inference sessions of `--max-length` tokens on the server (all of its blocks), prints one JSON line
`{"ready": ...}` once it holds what it could get, then in every open slot sends one-token steps as fast as the
server answers them; a slot whose session is refused or killed reopens it at once. It stops after `--duration`
seconds (or when stdin closes) and prints a final JSON line with what it got: sessions opened, refusals by
error code (with a sample message each), and steps done. A test-only tool: nothing in petalnode imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter

import torch

from petalnode.errors import PetalnodeError, RemoteError
from petalnode.identity import Identity, PeerAddress
from petalnode.node._protocol import (
    InferenceOpened,
    InferenceResult,
    InferenceStep,
    InfoRequest,
    OpenInference,
    ServerInfo,
)
from petalnode.rpc import RPC, RPCStream
from petalnode.transport import TcpTransport


class Flood:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.address = PeerAddress.parse(args.server)
        self.refusals: Counter[str] = Counter()
        self.samples: dict[str, str] = {}
        self.opened = 0
        self.steps = 0
        self.info: ServerInfo | None = None

    def _refused(self, error: BaseException) -> None:
        code = error.code if isinstance(error, RemoteError) else type(error).__name__
        self.refusals[code] += 1
        self.samples.setdefault(code, str(error)[:300])

    async def open(self, rpc: RPC) -> RPCStream | None:
        assert self.info is not None
        stream = await rpc.open_stream(self.address, "inference", expected=(InferenceOpened, InferenceResult))
        try:
            await stream.send(
                OpenInference(
                    model=self.info.model,
                    start_block=self.info.start_block,
                    end_block=self.info.end_block,
                    max_length=self.args.max_length,
                )
            )
            await stream.receive()
        except (PetalnodeError, OSError) as e:
            self._refused(e)
            await stream.aclose()
            return None
        self.opened += 1
        return stream

    async def step_until_refused(self, stream: RPCStream, deadline: float) -> None:
        hidden = torch.randn(1, 1, self.args.hidden)
        position = 0
        try:
            while time.monotonic() < deadline:
                await stream.send(InferenceStep(hidden=hidden, start_position=position))
                await stream.receive()
                self.steps += 1
                position = (position + 1) % self.args.max_length
        except (PetalnodeError, OSError) as e:
            self._refused(e)
        finally:
            await stream.aclose()

    async def slot(self, rpc: RPC, stream: RPCStream | None, deadline: float) -> None:
        # Bounded by the deadline: every pass either steps or pauses briefly after a refusal.
        while time.monotonic() < deadline:
            if stream is None:
                stream = await self.open(rpc)
                if stream is None:
                    await asyncio.sleep(self.args.reopen_pause)
                    continue
            await self.step_until_refused(stream, deadline)
            stream = None

    async def run(self) -> None:
        async with TcpTransport(Identity.generate()) as transport, RPC(transport) as rpc:
            info = await rpc.call(self.address, "info", InfoRequest(), expected=ServerInfo)
            assert isinstance(info, ServerInfo)
            self.info = info
            streams = [await self.open(rpc) for _ in range(self.args.sessions)]
            print(
                json.dumps(
                    {"ready": {"opened": self.opened, "refusals": dict(self.refusals), "samples": self.samples}}
                ),
                flush=True,
            )
            deadline = time.monotonic() + self.args.duration
            slots = [asyncio.create_task(self.slot(rpc, s, deadline)) for s in streams]
            stdin_closed = asyncio.create_task(_stdin_closed())
            pending: set[asyncio.Task] = set(slots)
            while pending and not stdin_closed.done():  # each pass ends at least one task
                _, pending = await asyncio.wait({*pending, stdin_closed}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stdin_closed)
            for task in [*slots, stdin_closed]:
                task.cancel()
            await asyncio.gather(*slots, stdin_closed, return_exceptions=True)
        print(
            json.dumps(
                {
                    "done": {
                        "opened": self.opened,
                        "steps": self.steps,
                        "refusals": dict(self.refusals),
                        "samples": self.samples,
                    }
                }
            ),
            flush=True,
        )


async def _stdin_closed() -> None:
    await asyncio.to_thread(sys.stdin.read)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", required=True, help="the server's full address (with its peer id)")
    parser.add_argument("--hidden", type=int, required=True, help="the model's hidden size")
    parser.add_argument("--sessions", type=int, default=32, help="sessions to try to hold at once")
    parser.add_argument("--max-length", type=int, default=1024, help="max_length of each session")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to flood")
    parser.add_argument("--reopen-pause", type=float, default=0.01, help="pause after a refused open")
    torch.set_num_threads(1)
    asyncio.run(Flood(parser.parse_args()).run())


if __name__ == "__main__":
    main()
