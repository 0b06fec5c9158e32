"""One exception tree for the whole package.

Every error petalnode raises on purpose derives from `PetalnodeError`, so a program embedding the library can
catch one type. Errors that may cross the wire carry a stable string `code`; the RPC layer sends the code and
message, and the receiving side rebuilds the same class with `error_from_code` (the message is untrusted text
and is only ever displayed, never evaluated).

    PetalnodeError
    ├── ConfigError                      bad user input (sizes, model ids, flags)
    │   └── ModelNotFoundError           a model id / path that is not available locally
    ├── CodecError                       malformed bytes, schema violation, size limit exceeded
    ├── ProtocolError
    │   ├── LocalProtocolError           we were about to break the protocol
    │   └── RemoteProtocolError          the peer broke it
    ├── TransportError
    │   ├── ConnectTimeoutError          (also a PetalnodeTimeoutError, see below)
    │   ├── HandshakeError               identity proof failed
    │   │   ├── PeerIdMismatchError      the peer is not the one the address names
    │   │   └── SwarmKeyMismatchError    the peer holds another swarm key, or none (private swarms)
    │   └── ConnectionClosedError        the other side vanished
    ├── ClosedResourceError              used after aclose()
    ├── InvalidStateError                wrong call for the current state
    ├── DHTError
    │   ├── InvalidRecordError           forged, tampered, expired or malformed record
    │   └── DHTTimeoutError              (also a PetalnodeTimeoutError)
    ├── ComputeError
    │   └── ShapeError                   a tensor of the wrong shape or dtype for the blocks
    ├── NoRouteError                     some blocks have no (usable) server
    │   └── VerificationError            verify="full" could not check a step (no second server, no majority)
    ├── VerificationRollback             outputs already returned were wrong: re-run from `position`
    ├── LocalSwarmError                  a process of the embedded local swarm failed to start
    │   └── StartupTimeoutError          (also a PetalnodeTimeoutError)
    └── RemoteError                      typed errors that travel back to an RPC caller
        ├── BusyError
        ├── OutOfCacheMemoryError        the KV-cache budget is exhausted (also raised locally)
        ├── UnknownSessionError
        ├── BadRequestError
        ├── RPCTimeoutError              (also a PetalnodeTimeoutError)
        └── InternalError

Timeouts form one family, so `except PetalnodeTimeoutError` catches every phase; each phase class also sits
under the layer it belongs to (multiple inheritance), so `except TransportError` still catches a connect
timeout. None of them derives from the builtin `TimeoutError` (an `OSError`: `except OSError` around socket
setup would catch it), and no builtin `TimeoutError` escapes a public call (`petalnode._timeouts.timeout_scope`
converts them at each phase boundary):

    PetalnodeTimeoutError                a phase took longer than its `Timeouts` field
    ├── ConnectTimeoutError              dialling (TransportError)                     Timeouts.connect
    │   └── HandshakeTimeoutError        the transport handshake   Timeouts.handshake / webrtc_handshake
    ├── RPCTimeoutError                  a call or stream receive (RemoteError, code "timeout")  .rpc
    │   ├── OpenTimeoutError             opening an inference session on a server          Timeouts.open
    │   └── StepTimeoutError             one inference step / forward / backward           Timeouts.step
    ├── DHTTimeoutError                  DHT bootstrap or lookup (DHTError)   dht_bootstrap / dht_lookup
    ├── ClientTimeoutError               the synchronous client facade (`RemoteBlockChain`)  .client_start
    └── StartupTimeoutError              a local swarm process not ready in time (LocalSwarmError)
"""

from __future__ import annotations


class PetalnodeError(Exception):
    """Base of every error petalnode raises on purpose."""


class ConfigError(PetalnodeError):
    """A setting or argument given by the user makes no sense."""


class ModelNotFoundError(ConfigError):
    """The model id or path is not available on this machine (nothing is downloaded implicitly)."""


class CodecError(PetalnodeError):
    """Bytes that do not decode to a valid message or tensor under the configured limits."""


class ProtocolError(PetalnodeError):
    """A protocol rule was broken."""


class LocalProtocolError(ProtocolError):
    """We were about to violate the protocol; a bug on our side or a misuse of the API."""


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol."""


class TransportError(PetalnodeError):
    """A connection could not be made or was lost."""


class PetalnodeTimeoutError(PetalnodeError):
    """A phase took longer than its timeout (see `petalnode.Timeouts`); the base of every petalnode timeout."""


class ConnectTimeoutError(PetalnodeTimeoutError, TransportError):
    """Connecting (or the handshake) took longer than the connect timeout."""


class HandshakeTimeoutError(ConnectTimeoutError):
    """The transport handshake (identity proof, WebRTC offer/answer) took longer than its timeout."""


class HandshakeError(TransportError):
    """The peer failed to prove its identity or the handshake was malformed."""


class PeerIdMismatchError(HandshakeError):
    """The peer proved an identity, but not the one the dialled address names."""


class SwarmKeyMismatchError(HandshakeError):
    """The peer does not hold this node's swarm key (another private swarm, or a public node, or vice versa)."""


class ConnectionClosedError(TransportError):
    """The connection was closed or the peer vanished."""


class ClosedResourceError(PetalnodeError):
    """The object was used after `aclose()`."""


class InvalidStateError(PetalnodeError):
    """The call is not allowed in the object's current state."""


class DHTError(PetalnodeError):
    """A DHT operation failed."""


class InvalidRecordError(DHTError):
    """A DHT record is forged, tampered with, expired, replayed or malformed."""


class DHTTimeoutError(PetalnodeTimeoutError, DHTError):
    """A DHT bootstrap or lookup took longer than its timeout."""


class ComputeError(PetalnodeError):
    """The compute module could not run the request."""


class ShapeError(ComputeError):
    """A tensor has the wrong shape or dtype for the hosted blocks."""


class NoRouteError(PetalnodeError):
    """No chain of usable servers covers the requested blocks; `missing` lists the uncovered [start, end) runs."""

    def __init__(self, message: str, *, missing: list[tuple[int, int]] | None = None) -> None:
        super().__init__(message)
        self.missing = list(missing or [])


class VerificationError(NoRouteError):
    """verify="full" could not check a step: no independent server hosts some blocks, or servers disagree with no
    majority."""


class VerificationRollback(PetalnodeError):
    """A check found that outputs the session already returned were wrong (the liar is banned): the session now
    holds positions [0, position) only, and the caller re-runs from there (the library's `generate` does)."""

    def __init__(self, position: int) -> None:
        super().__init__(f"outputs from position {position} on were wrong (a server lied and was banned); the "
                         f"session rolled back to position {position}")
        self.position = position


class LocalSwarmError(PetalnodeError):
    """A bootstrap or server process of the embedded local swarm exited or failed before it was ready."""


class StartupTimeoutError(PetalnodeTimeoutError, LocalSwarmError):
    """A local swarm process did not become ready within its startup timeout."""


class RemoteError(PetalnodeError):
    """An error that travels to the caller of an RPC as a code and a message."""

    code: str = "internal"


class BusyError(RemoteError):
    """The server cannot take more work now; try another server."""

    code = "busy"


class OutOfCacheMemoryError(RemoteError):
    """Allocating the requested KV cache would exceed the server's cache budget."""

    code = "out_of_cache_memory"


class UnknownSessionError(RemoteError):
    """The session id is not (or no longer) known to the server."""

    code = "unknown_session"


class BadRequestError(RemoteError):
    """The request was well-formed bytes but asked for something invalid."""

    code = "bad_request"


class RPCTimeoutError(PetalnodeTimeoutError, RemoteError):
    """The call did not complete within its timeout."""

    code = "timeout"


# Open and step timeouts are RPC timeouts (an RPC stream receive that got nothing in time), so code that catches
# RPCTimeoutError, and the failover policy that treats it as the server's fault, see them unchanged.
class OpenTimeoutError(RPCTimeoutError):
    """Opening an inference session on a server took longer than `Timeouts.open`."""


class StepTimeoutError(RPCTimeoutError):
    """An inference step (or forward/backward pass) on a server took longer than `Timeouts.step`."""


class ClientTimeoutError(PetalnodeTimeoutError):
    """An operation of the synchronous client facade took longer than its timeout."""


class InternalError(RemoteError):
    """The server failed while handling a valid request."""

    code = "internal"


_REMOTE_ERRORS: dict[str, type[RemoteError]] = {
    cls.code: cls
    for cls in (BusyError, OutOfCacheMemoryError, UnknownSessionError, BadRequestError, RPCTimeoutError, InternalError)
}


def error_from_code(code: str, message: str) -> RemoteError:
    """Rebuild a typed error from the code and message a peer sent; unknown codes become `InternalError`."""
    cls = _REMOTE_ERRORS.get(code, InternalError)
    return cls(message)
