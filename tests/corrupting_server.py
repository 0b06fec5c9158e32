"""A server that returns wrong hidden states: for the verification tests and benchmarks/integrity.py only.

It is an ordinary `petalnode join` whose loaded span is wrapped so that its outputs are wrong in one of the ways a
broken or malicious machine's are, and which may announce a throughput it does not have (to attract clients):

    python -m tests.corrupting_server --kind noise|zeros|skip [--from-position P] [--after-steps S]
        [--claim-throughput X] -- <petalnode join arguments>

- noise: adds Gaussian noise of --noise times the output's RMS (small: the output still looks plausible);
- zeros: returns zeros; skip: returns its input unchanged (as if it skipped its blocks);
- --from-position P: only positions >= P are wrong (P=64: wrong only on long contexts);
- --after-steps S: honest for the first S inference steps of each session, wrong after.
Nothing in petalnode imports this: a corrupting server exists only inside the tests, never as a product flag.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from petalnode.node import _backend


class CorruptingSpan:
    """Wraps a loaded span's `forward_span` (and the sub-spans sessions use) to return wrong outputs."""

    def __init__(self, kind: str, *, noise: float, from_position: int, after_steps: int, seed: int = 0) -> None:
        self.kind = kind
        self.noise = noise
        self.from_position = from_position
        self.after_steps = after_steps
        self._steps: dict[int, int] = {}  # per session: its cache object's id -> steps so far
        self._generator = torch.Generator().manual_seed(seed)

    def wrap(self, span: Any) -> Any:
        inner_forward, inner_subspan = span.forward_span, getattr(span, "subspan", None)

        def forward_span(hidden: torch.Tensor, cache: Any, position_ids: torch.Tensor,
                         prompts: torch.Tensor | None = None) -> torch.Tensor:
            out = inner_forward(hidden, cache, position_ids, prompts)
            return self.corrupt(hidden, out, position_ids, session=None if cache is None else id(cache))

        span.forward_span = forward_span
        if inner_subspan is not None:
            def subspan(start: int, end: int) -> Any:
                sub = inner_subspan(start, end)
                return span if sub is span else self.wrap(sub)

            span.subspan = subspan
        return span

    def corrupt(self, hidden: torch.Tensor, out: torch.Tensor, position_ids: torch.Tensor, *,
                session: int | None) -> torch.Tensor:
        if session is not None:
            if len(self._steps) > 10_000:
                self._steps.clear()
            steps = self._steps[session] = self._steps.get(session, 0) + 1
            if steps <= self.after_steps:
                return out
        wrong = (position_ids.reshape(-1)[-out.shape[1]:] >= self.from_position).to(out.device)
        if not bool(wrong.any()):
            return out
        if self.kind == "noise":
            scale = self.noise * out.float().pow(2).mean().sqrt()
            bad = out + (scale * torch.randn(out.shape, generator=self._generator)).to(out.dtype)
        elif self.kind == "zeros":
            bad = torch.zeros_like(out)
        elif self.kind == "skip":
            bad = hidden.to(out.dtype)
        else:
            raise ValueError(f"unknown corruption {self.kind!r}")
        return torch.where(wrong[None, :, None], bad, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["noise", "zeros", "skip"], required=True)
    parser.add_argument("--noise", type=float, default=1e-2, help="noise RMS relative to the output's")
    parser.add_argument("--from-position", type=int, default=0)
    parser.add_argument("--after-steps", type=int, default=0)
    parser.add_argument("--claim-throughput", type=float, default=None)
    parser.add_argument("join", nargs=argparse.REMAINDER, help="-- then the `petalnode join` arguments")
    args = parser.parse_args(argv)
    corruption = CorruptingSpan(args.kind, noise=args.noise, from_position=args.from_position,
                                after_steps=args.after_steps)
    load_span = _backend.TorchBackend.load_span
    throughput = _backend.TorchBackend.throughput

    def corrupting_load_span(self: Any, *a: Any, **kw: Any) -> Any:
        return corruption.wrap(load_span(self, *a, **kw))

    def claimed_throughput(self: Any, *a: Any, **kw: Any) -> float:
        real = throughput(self, *a, **kw)
        return real if args.claim_throughput is None else args.claim_throughput

    _backend.TorchBackend.load_span = corrupting_load_span  # type: ignore[method-assign]
    _backend.TorchBackend.throughput = claimed_throughput  # type: ignore[method-assign]
    from petalnode.cli import main as petalnode_main

    join = args.join[1:] if args.join[:1] == ["--"] else args.join
    return petalnode_main(["join", *join])


if __name__ == "__main__":
    sys.exit(main())
