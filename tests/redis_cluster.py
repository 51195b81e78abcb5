"""A real Redis Cluster on 127.0.0.1 for tests and benchmarks: Debian's redis-server, 3 masters +
3 replicas on free ports, each node in its own directory under `root`, created with
`redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes`.

    with RedisClusterProcs(tmp_dir) as rc:
        url = rc.url            # redis://127.0.0.1:<port of the first master>

`redis_missing()` says why none can be started (installed by scripts/install_redis.sh).
"""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

NODE_CONF = """port {port}
bind 127.0.0.1
protected-mode no
cluster-enabled yes
cluster-config-file nodes.conf
cluster-node-timeout {node_timeout_ms}
cluster-require-full-coverage no
cluster-replica-validity-factor 0
appendonly no
save ""
repl-diskless-sync-delay 0
dir {dir}
maxmemory {maxmemory}
maxmemory-policy allkeys-lru
"""


def redis_missing() -> str | None:
    missing = [b for b in ("redis-server", "redis-cli") if not shutil.which(b)]
    if missing:
        return f"{' and '.join(missing)} not on PATH (scripts/install_redis.sh installs Debian's redis-server)"
    return None


def _ephemeral_low() -> int:
    try:
        return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_ports(n: int) -> list[int]:
    """n ports whose cluster-bus port (+10000) is free too, both below the kernel's ephemeral range:
    a port taken from that range (bind to 0) can be handed to any outgoing connection of this machine
    before redis-server binds it, and the node then never answers."""
    import random
    hi = min(_ephemeral_low(), 65536) - 10000 - 1
    lo = max(1024, hi - 20000)
    if hi <= lo:
        lo, hi = 20000, 22767
    out: list[int] = []
    for port in random.sample(range(lo, hi), min(hi - lo, 4000)):
        if len(out) == n:
            break
        ok = True
        for p in (port, port + 10000):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            out.append(port)
    if len(out) < n:
        raise RuntimeError(f"redis cluster: found only {len(out)} of {n} free port pairs in {lo}..{hi}")
    return out


def replicas_synced(info: str, want: int = 0) -> bool:
    """From a master's `INFO replication` text: at least `want` replicas, every one online and at the
    master's replication offset (nothing of the master's writes still on its way)."""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    offset = fields.get("master_repl_offset")
    replicas = [dict(kv.split("=", 1) for kv in v.split(",") if "=" in kv)
                for k, v in fields.items() if k.startswith("slave") and k[5:].isdigit()]
    return (len(replicas) >= want
            and all(r.get("state") == "online" and r.get("offset") == offset for r in replicas))


class RedisClusterProcs:
    def __init__(self, root: Path, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000,
                 maxmemory: str = "256mb"):
        self.root = Path(root)
        self.n = masters * (1 + replicas)
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.maxmemory = maxmemory
        self.ports: list[int] = []
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def cli(self, port: int, *args: str, timeout: float = 10) -> str:
        return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                              timeout=timeout).stdout

    def start(self) -> "RedisClusterProcs":
        self.ports = []
        for port in _free_ports(self.n):
            self.ports.append(self._start_node(port))
        r = subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                            "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed: {r.stdout[-800:]} {r.stderr[-800:]}")
        self.wait_ok()
        self.wait_replicas()
        return self

    def _start_node(self, port: int, tries: int = 5) -> int:
        """Start one node and wait for its PONG; a node that exits first (its port was taken between
        the check and redis-server's bind) is started again on another free port. Returns the port."""
        for _ in range(tries):
            d = self.root / f"node-{port}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "redis.conf").write_text(NODE_CONF.format(port=port, dir=d, node_timeout_ms=self.node_timeout_ms,
                                                           maxmemory=self.maxmemory))
            with open(d / "log", "ab") as log:
                proc = subprocess.Popen(["redis-server", str(d / "redis.conf")], stdout=log,
                                        stderr=subprocess.STDOUT)
            self.procs[port] = proc
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if self.cli(port, "ping", timeout=2).strip() == "PONG":
                        return port
                except (subprocess.SubprocessError, OSError):
                    pass
                time.sleep(0.1)
            self.procs.pop(port)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            tail = (d / "log").read_text(errors="replace")[-400:]
            port = next(p for p in _free_ports(self.n + 1) if p not in self.procs)
        self.stop()
        raise TimeoutError(f"redis cluster: no node answered after {tries} starts; last log: {tail}")

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every live node reports cluster_state:ok and sees every slot served."""
        def ok():
            return all("cluster_state:ok" in self.cli(p, "cluster", "info") for p in self.procs)
        self._wait(ok, "cluster_state:ok", timeout)

    def wait_replicas(self, timeout: float = 30) -> None:
        """Until every live master has its replicas online and caught up: a replica's first sync
        (a fork of its master and a full copy) must not land inside a test or a timed run."""
        def synced():
            return all(replicas_synced(self.cli(p, "info", "replication"), self.replicas) for p in self.masters())
        self._wait(synced, "the replicas' first sync", timeout)

    def masters(self) -> list[int]:
        """Ports of the live masters."""
        out = []
        for line in self.cli(next(iter(self.procs)), "cluster", "nodes").splitlines():
            f = line.split()
            if "master" in f[2] and "fail" not in f[2]:
                port = int(f[1].split("@")[0].rsplit(":", 1)[1])
                if port in self.procs:
                    out.append(port)
        return out

    def kill(self, port: int) -> None:
        """SIGKILL one node (it stays down)."""
        p = self.procs.pop(port)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)

    @staticmethod
    def _wait(cond, what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if cond():
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"redis cluster: timed out waiting for {what}")

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """A fresh 3-master + 3-replica cluster for one test module (skipped without redis-server)."""
    why = redis_missing()
    if why:
        pytest.skip(why)
    with RedisClusterProcs(tmp_path_factory.mktemp("redis-cluster")) as rc:
        yield rc
