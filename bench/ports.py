"""Free local ports for the benchmark and fault-drill clusters."""

from __future__ import annotations

import random
import socket


def free_ports(n: int, rng: random.Random) -> int:
    """A base port with ``n`` consecutive free ports (random, to stay clear of other users)."""
    for _ in range(200):
        base = rng.randrange(20_000, 40_000)
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range found")
