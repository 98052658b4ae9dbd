"""Redis deployments for tests and benchmarks, each process started on a free port and stopped by
its PID: a Redis Cluster of three masters (and replicas on demand), and a master with a replica
watched by three sentinels. Never the shared Redis."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import redis

from ._support import free_port, redis_server_binary, wait_until

__all__ = ["Cluster", "SentinelGroup", "redis_cli_binary", "tls_files"]

#: Milliseconds a cluster node or a sentinel waits before it calls a silent master down: short,
#: so a failover takes a second or two in the tests.
NODE_TIMEOUT_MS = 1000
#: Seconds a deployment gets to come up, or a failover to complete.
SETTLE_TIMEOUT_S = 30.0


def redis_cli_binary() -> str:
    """The redis-cli next to the redis-server the tests use (``--cluster create`` needs 5+)."""
    beside = Path(redis_server_binary()).with_name("redis-cli")
    if beside.exists():
        return str(beside)
    found = shutil.which("redis-cli")
    if found is None:
        raise RuntimeError("no redis-cli: install Redis")
    return found


def cluster_port() -> int:
    """A free port whose cluster bus port (10,000 above it) is free too and below 65,536."""
    import socket

    while True:
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class _Processes:
    """redis-server processes, each in a folder of its own, all stopped by PID."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="op-celery-deployment-"))
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        #: redis-py options of a client of these servers (TLS ones, when they listen on TLS).
        self.client_options: dict[str, Any] = {}

    def spawn(self, port: int, args: list[str], sentinel: bool = False) -> None:
        folder = self.folder / str(port)
        folder.mkdir()
        config = folder / "redis.conf"
        config.write_text("")  # sentinel and cluster nodes rewrite their config file
        command = [redis_server_binary(), str(config)]
        if sentinel:
            command.append("--sentinel")
        command += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                    "--save", "", "--appendonly", "no", "--loglevel", "warning",
                    "--logfile", str(folder / "log"), *args]  # fmt: skip
        self.processes[port] = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis("127.0.0.1", port, socket_connect_timeout=0.2, **self.client_options)
        if not wait_until(lambda: _pings(client) or self.processes[port].poll() is not None, 10):
            raise RuntimeError(f"redis-server on {port} did not answer: {self.log(port)}")
        if self.processes[port].poll() is not None:
            raise RuntimeError(f"redis-server on {port} exited: {self.log(port)}")

    def log(self, port: int) -> str:
        path = self.folder / str(port) / "log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def kill(self, port: int) -> None:
        """SIGKILL one server, as a crash would."""
        process = self.processes.get(port)
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)

    def alive(self, port: int) -> bool:
        process = self.processes.get(port)
        return process is not None and process.poll() is None

    def stop(self) -> None:
        for port in list(self.processes):
            self.kill(port)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Cluster(_Processes):
    """A Redis Cluster of three masters on free ports, built by ``redis-cli --cluster create``."""

    def __init__(self, masters: int = 3, tls: dict[str, Path] | None = None) -> None:
        super().__init__()
        self.masters: list[int] = []
        self.tls = tls
        node_args = list(_CLUSTER_ARGS)
        cli_args: list[str] = []
        if tls is not None:  # TLS only: clients, the cluster bus and replication
            node_args += ["--tls-port", "{port}", "--port", "0", "--tls-cluster", "yes",
                          "--tls-replication", "yes", "--tls-cert-file", str(tls["cert"]),
                          "--tls-key-file", str(tls["key"]), "--tls-ca-cert-file", str(tls["ca"]),
                          "--tls-auth-clients", "no"]  # fmt: skip
            cli_args = ["--tls", "--cacert", str(tls["ca"])]
            self.client_options = {"ssl": True, "ssl_ca_certs": str(tls["ca"])}
        self._node_args = node_args
        try:
            for _ in range(masters):
                port = cluster_port()
                self.spawn(port, [arg.replace("{port}", str(port)) for arg in node_args])
                self.masters.append(port)
            subprocess.run(
                [redis_cli_binary(), "--cluster", "create",
                 *(f"127.0.0.1:{port}" for port in self.masters), "--cluster-yes", *cli_args],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            if not wait_until(self.healthy, SETTLE_TIMEOUT_S):
                raise RuntimeError("the cluster did not reach cluster_state:ok")
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        nodes = ",".join(f"127.0.0.1:{port}" for port in self.masters)
        if self.tls is None:
            return "redis+cluster://" + nodes
        return f"rediss+cluster://{nodes}?ssl_cert_reqs=required&ssl_ca_certs={self.tls['ca']}"

    def node(self, port: int) -> redis.Redis:
        return redis.Redis("127.0.0.1", port, socket_timeout=2, socket_connect_timeout=1,
                           **self.client_options)  # fmt: skip

    def healthy(self) -> bool:
        """Every live node sees every slot served."""
        live = [port for port in self.processes if self.alive(port)]
        try:
            return all(self.node(port).cluster("info")["cluster_state"] == "ok" for port in live)
        except redis.RedisError:
            return False

    def owner(self, slot: int) -> int:
        """The port of the master serving ``slot``."""
        for start, end, master, *_ in self.node(self.masters[0]).execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        raise LookupError(slot)

    def add_replica(self, master_port: int) -> int:
        """Start a replica of ``master_port``; its port once it has synced."""
        port = cluster_port()
        self.spawn(port, [arg.replace("{port}", str(port)) for arg in self._node_args])
        master = self.node(master_port)
        master_id = master.execute_command("CLUSTER MYID")
        master_id = master_id.decode() if isinstance(master_id, bytes) else master_id
        replica = self.node(port)
        replica.execute_command("CLUSTER MEET", "127.0.0.1", master_port)
        wait_until(lambda: _knows(replica, master_id), SETTLE_TIMEOUT_S)
        replica.execute_command("CLUSTER REPLICATE", master_id)
        if not wait_until(lambda: _synced(replica), SETTLE_TIMEOUT_S):
            raise RuntimeError(f"replica {port} of {master_port} did not sync")
        wait_until(self.healthy, SETTLE_TIMEOUT_S)
        return port

    def is_master(self, port: int) -> bool:
        try:
            return bool(self.node(port).info("replication")["role"] == "master")
        except redis.RedisError:
            return False


class SentinelGroup(_Processes):
    """A master, one replica, and three sentinels watching them as ``mymaster``."""

    def __init__(
        self,
        master_name: str = "mymaster",
        password: str | None = None,
        sentinel_password: str | None = None,
        tls: dict[str, Path] | None = None,
    ) -> None:
        super().__init__()
        self.master_name = master_name
        self.password = password
        #: The sentinels' own password (``requirepass`` on each, ``sentinel-pass`` between them).
        self.sentinel_password = sentinel_password
        self.tls = tls
        auth = ["--requirepass", password, "--masterauth", password] if password else []
        self._tls_lines: list[str] = []
        if tls is not None:  # TLS only, between every process too
            self._tls_lines = [
                "tls-replication yes", f"tls-cert-file {tls['cert']}",
                f"tls-key-file {tls['key']}", f"tls-ca-cert-file {tls['ca']}",
                "tls-auth-clients no",
            ]  # fmt: skip
            for line in self._tls_lines:
                key, value = line.split(" ", 1)
                auth += [f"--{key}", value]
            self.client_options = {"ssl": True, "ssl_ca_certs": str(tls["ca"])}
        try:
            self.data_ports = [free_port(), free_port()]
            for port in self.data_ports:
                listen = ["--tls-port", str(port), "--port", "0"] if tls is not None else []
                replica = [] if port == self.data_ports[0] else [
                    "--replicaof", "127.0.0.1", str(self.data_ports[0])]  # fmt: skip
                self.spawn(port, [*auth, *listen, *replica])
            self.sentinel_ports: list[int] = []
            for _ in range(3):
                port = free_port()
                self.sentinel_ports.append(port)
                self._spawn_sentinel(port)
            if not wait_until(self._settled, SETTLE_TIMEOUT_S):
                raise RuntimeError("the sentinels did not find the replica and each other")
        except BaseException:
            self.stop()
            raise

    def _spawn_sentinel(self, port: int) -> None:
        master = self.data_ports[0]
        folder = self.folder / str(port)
        folder.mkdir()
        listen = [f"tls-port {port}", "port 0", *self._tls_lines] if self.tls else [f"port {port}"]
        lines = [
            *listen, "bind 127.0.0.1", f"dir {folder}",
            f"sentinel monitor {self.master_name} 127.0.0.1 {master} 2",
            f"sentinel down-after-milliseconds {self.master_name} {NODE_TIMEOUT_MS}",
            f"sentinel failover-timeout {self.master_name} 10000",
            f"sentinel parallel-syncs {self.master_name} 1",
            f"logfile {folder / 'log'}",
        ]  # fmt: skip
        if self.password:
            lines.append(f"sentinel auth-pass {self.master_name} {self.password}")
        if self.sentinel_password:
            lines += [f"requirepass {self.sentinel_password}",
                      f"sentinel sentinel-pass {self.sentinel_password}"]  # fmt: skip
        config = folder / "sentinel.conf"
        config.write_text("\n".join(lines) + "\n")
        self.processes[port] = subprocess.Popen(
            [redis_server_binary(), str(config), "--sentinel"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis("127.0.0.1", port, socket_connect_timeout=0.2, **self.client_options)
        if not wait_until(lambda: _pings(client), 10):
            raise RuntimeError(f"sentinel on {port} did not answer: {self.log(port)}")

    def sentinel(self, port: int | None = None) -> redis.Redis:
        return redis.Redis("127.0.0.1", port or self.sentinel_ports[0],
                           password=self.sentinel_password, socket_timeout=2,
                           **self.client_options)  # fmt: skip

    def _settled(self) -> bool:
        try:
            for port in self.sentinel_ports:
                state = self.sentinel(port).execute_command("SENTINEL MASTER", self.master_name)
                info = _pairs(state)
                if int(info["num-slaves"]) < 1 or int(info["num-other-sentinels"]) < 2:
                    return False
            return True
        except redis.RedisError:
            return False

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        url = ";".join(f"sentinel://{auth}127.0.0.1:{port}" for port in self.sentinel_ports)
        if self.tls is not None:
            url += f"?ssl=true&ssl_cert_reqs=required&ssl_ca_certs={self.tls['ca']}"
        return url

    def data_node(self, port: int) -> redis.Redis:
        return redis.Redis("127.0.0.1", port, password=self.password, socket_timeout=1,
                           **self.client_options)  # fmt: skip

    def master_port(self) -> int:
        """The port the sentinels name as master now."""
        _host, port = self.sentinel().execute_command(
            "SENTINEL GET-MASTER-ADDR-BY-NAME", self.master_name
        )
        return int(port)

    def failover(self) -> None:
        """Ask the sentinels to promote the replica now; replication is asynchronous, so a write
        the replica has not received yet is lost (tests wait for it first)."""
        self.sentinel().execute_command("SENTINEL FAILOVER", self.master_name)

    def wait_for_new_master(self, old: int) -> int:
        """Wait until the sentinels name another master than ``old`` and it takes writes."""

        def switched() -> bool:
            try:
                port = self.master_port()
                if port == old:
                    return False
                node = self.data_node(port)
                return bool(node.info("replication")["role"] == "master")
            except (redis.RedisError, OSError):
                return False

        if not wait_until(switched, SETTLE_TIMEOUT_S, interval=0.1):
            raise RuntimeError(f"no failover from {old}: {self.log(self.sentinel_ports[0])}")
        return self.master_port()


_CLUSTER_ARGS = ["--cluster-enabled", "yes", "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                 "--cluster-config-file", "nodes.conf"]  # fmt: skip


def tls_files(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 it signed, in ``folder``."""
    files = {name: folder / f"{name}.pem" for name in ("ca", "ca-key", "cert", "key")}
    config = folder / "san.cnf"
    config.write_text("subjectAltName=IP:127.0.0.1\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
            "-keyout", str(files["ca-key"]), "-out", str(files["ca"]))  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", str(files["key"]), "-out", str(folder / "req.pem"))  # fmt: skip
    openssl("x509", "-req", "-in", str(folder / "req.pem"), "-CA", str(files["ca"]),
            "-CAkey", str(files["ca-key"]), "-CAcreateserial", "-days", "1",
            "-extfile", str(config), "-out", str(files["cert"]))  # fmt: skip
    return files


def _pings(client: redis.Redis) -> bool:
    """Whether the server answers (a refusal for want of a password is an answer too)."""
    try:
        return bool(client.ping())
    except (redis.ResponseError, redis.AuthenticationError):
        return True
    except redis.RedisError:
        return False


def _pairs(flat: Any) -> dict[str, str]:
    if isinstance(flat, dict):
        return {_text(k): _text(v) for k, v in flat.items()}
    items = [_text(item) for item in flat]
    return dict(zip(items[::2], items[1::2], strict=True))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _knows(client: redis.Redis, node_id: str) -> bool:
    try:
        return node_id in _text(client.execute_command("CLUSTER NODES"))
    except redis.RedisError:
        return False


def _synced(replica: redis.Redis) -> bool:
    try:
        info = replica.info("replication")
        return info.get("master_link_status") == "up"
    except redis.RedisError:
        return False
