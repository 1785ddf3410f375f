"""Two test hosts: network namespaces src and dst joined by a veth pair, each end rate-limited by tc tbf (used by
tests/test_migrate.py and tools/bench_migrate.py)."""

from __future__ import annotations

import os
import secrets
import subprocess


def sh(*args: object) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True, timeout=60)


class Hosts:
    """src (10.77.0.1) and dst (10.77.0.2), names unique per run (``prefix`` + pid + random), a veth pair between
    them limited to ``rate`` each way. :meth:`remove` deletes both namespaces (and the pair with them)."""

    def __init__(self, rate: str = "1gbit", prefix: str = "wpm") -> None:
        tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.src, self.dst = f"{prefix}s{tag}", f"{prefix}d{tag}"
        self.src_ip, self.dst_ip = "10.77.0.1", "10.77.0.2"
        sh("ip", "netns", "add", self.src)
        try:
            sh("ip", "netns", "add", self.dst)
            va, vb = f"vs{tag}"[:15], f"vd{tag}"[:15]
            sh("ip", "link", "add", va, "netns", self.src, "type", "veth", "peer", "name", vb, "netns", self.dst)
            for ns, dev, ip in ((self.src, va, self.src_ip), (self.dst, vb, self.dst_ip)):
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")  # CRIU needs lo up
                sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "1mb",
                   "latency", "50ms")
        except BaseException:
            self.remove()
            raise

    def run(self, ns: str, *args: object) -> list[str]:
        """A command line that runs in the network namespace ``ns`` only (docs/kernel.md: not ip netns exec)."""
        return ["nsenter", f"--net=/run/netns/{ns}", *map(str, args)]

    def remove(self) -> None:
        for ns in (self.src, self.dst):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
