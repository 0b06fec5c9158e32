"""A NAT test bed of network namespaces: a fake Internet with a public peer and two home networks behind NAT.

    home A (10.1.0.2) -- router A [10.1.0.1 | 198.18.0.2] --\
                                                              br0 in "wan" (198.18.0.1: public peer, STUN, TURN)
    home B (10.2.0.2) -- router B [10.2.0.1 | 198.18.0.3] --/

Routers do source NAT (nftables masquerade; `fully-random` makes it symmetric) and drop unsolicited input from
the WAN like a home router. Addresses: 198.18.0.0/15 is the benchmarking range (RFC 2544), never routed on the
real Internet; 10.x are private. Nothing touches the root namespace, so no traffic leaves the machine.

Invariants:
- Namespace names carry the creating process id, so parallel runs never collide; a bed whose creator died
  without cleaning up (SIGKILL) is deleted by the next `NatBed.create()`.
- `NatBed.close()` kills every process started in the bed and deletes every namespace, and it is idempotent;
  the bed is always used inside try/finally (or as a context manager).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

PUBLIC_IP = "198.18.0.1"
_NAME = re.compile(r"pnbed(\d+)(wan|ra|ha|rb|hb)$")
_HOMES = {"a": ("10.1.0", "198.18.0.2"), "b": ("10.2.0", "198.18.0.3")}


class BedUnavailable(Exception):
    """The machine cannot build the bed (not root, no `ip netns`, no nftables); the message says which."""


def check_available() -> None:
    """Raise `BedUnavailable` with a precise reason if the bed cannot be built here."""
    if os.geteuid() != 0:
        raise BedUnavailable("the NAT test bed needs root (network namespaces); run the tests as root")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            raise BedUnavailable(f"the NAT test bed needs `{tool}` (Debian package {package})")
    probe = f"pnprobe{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if result.returncode != 0:
        raise BedUnavailable(f"`ip netns add` does not work here: {result.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def _run(*args: str, input: str | None = None) -> None:
    result = subprocess.run(list(args), capture_output=True, text=True, input=input, timeout=20)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")


def _router_rules(symmetric: bool, loss_percent: int) -> str:
    random = " fully-random" if symmetric else ""
    loss = f"        meta l4proto udp numgen random mod 100 < {loss_percent} drop\n" if loss_percent else ""
    return f"""flush ruleset
table ip nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade{random}
    }}
}}
table inet filter {{
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
{loss}        iifname "lan" accept
        ct state established,related accept
    }}
}}
"""


def _delete_orphans() -> None:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NAME.match(name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


@dataclass
class NatBed:
    """The namespaces and processes of one bed; build with `NatBed.create()`."""

    prefix: str
    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen] = field(default_factory=list)
    closed: bool = False

    @classmethod
    def create(cls) -> NatBed:
        _delete_orphans()
        bed = cls(prefix=f"pnbed{os.getpid()}")
        try:
            bed._build()
        except BaseException:
            bed.close()
            raise
        return bed

    def ns(self, name: str) -> str:
        """Full namespace name: 'wan', 'ra', 'ha', 'rb', 'hb'."""
        return f"{self.prefix}{name}"

    def _build(self) -> None:
        for name in ("wan", "ra", "ha", "rb", "hb"):
            _run("ip", "netns", "add", self.ns(name))
            self.namespaces.append(self.ns(name))
            _run("ip", "-n", self.ns(name), "link", "set", "lo", "up")
        wan = self.ns("wan")
        _run("ip", "-n", wan, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", wan, "addr", "add", f"{PUBLIC_IP}/24", "dev", "br0")
        _run("ip", "-n", wan, "link", "set", "br0", "up")
        for home, (lan, wan_ip) in _HOMES.items():
            router, host = self.ns(f"r{home}"), self.ns(f"h{home}")
            _run("ip", "-n", router, "link", "add", "wan", "type", "veth", "peer", "name", f"to{home}", "netns", wan)
            _run("ip", "-n", wan, "link", "set", f"to{home}", "master", "br0")
            _run("ip", "-n", wan, "link", "set", f"to{home}", "up")
            _run("ip", "-n", router, "addr", "add", f"{wan_ip}/24", "dev", "wan")
            _run("ip", "-n", router, "link", "set", "wan", "up")
            _run("ip", "-n", router, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", host)
            _run("ip", "-n", router, "addr", "add", f"{lan}.1/24", "dev", "lan")
            _run("ip", "-n", router, "link", "set", "lan", "up")
            _run("ip", "-n", host, "addr", "add", f"{lan}.2/24", "dev", "eth0")
            _run("ip", "-n", host, "link", "set", "eth0", "up")
            _run("ip", "-n", host, "route", "add", "default", "via", f"{lan}.1")
            _run("ip", "netns", "exec", router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
            self.set_nat(home)

    def host_ip(self, home: str) -> str:
        return f"{_HOMES[home][0]}.2"

    def set_nat(self, home: str, *, symmetric: bool = False, loss_percent: int = 0) -> None:
        """(Re)configure router `home`: cone-like masquerade or symmetric (`fully-random`), optional UDP loss."""
        _run("ip", "netns", "exec", self.ns(f"r{home}"), "nft", "-f", "-", input=_router_rules(symmetric, loss_percent))

    def set_rate(self, home: str, rate: str | None) -> None:
        """Limit router `home`'s WAN uplink with a token bucket (e.g. '4mbit'); None removes the limit."""
        router = self.ns(f"r{home}")
        subprocess.run(["tc", "-n", router, "qdisc", "del", "dev", "wan", "root"], capture_output=True)
        if rate is not None:
            _run("tc", "-n", router, "qdisc", "add", "dev", "wan", "root", "tbf", "rate", rate, "burst", "32kbit",
                 "latency", "200ms")

    def spawn(self, where: str, args: list[str], **popen: object) -> subprocess.Popen:
        """Start `args` inside namespace `where` ('wan', 'ha', 'hb'); killed by `close()`."""
        process = subprocess.Popen(["ip", "netns", "exec", self.ns(where), *args], start_new_session=True,
                                   **popen)  # type: ignore[call-overload]
        self.processes.append(process)
        return process

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
        self.namespaces.clear()

    def __enter__(self) -> NatBed:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
