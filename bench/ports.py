"""Free local ports for the benchmark, fault-drill and NGINX-pool clusters."""

from __future__ import annotations

import random
import socket

PORT_RANGE = (20_000, 32_000)
"""Listen ports come from below Linux's ephemeral range (32768+), where the benchmark's own
client connections would otherwise take a port between two starts."""


def free_ports(n: int, rng: random.Random) -> int:
    """A base port with ``n`` consecutive free ports (random, to stay clear of other users)."""
    for _ in range(200):
        base = rng.randrange(PORT_RANGE[0], PORT_RANGE[1] - n)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port range found")
