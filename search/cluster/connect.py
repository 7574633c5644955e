"""Joining Ray: an existing cluster by address, or a local one that listens on loopback only."""

from __future__ import annotations

import math
import os
import signal
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from search import environment
from search.config import ConfigError
from search.output.console import divert_logs

# A live head answers in milliseconds; 5 s also covers two lost packets (TCP resends after 1 s,
# then after 2 s more). Ray's own wait for a head that does not answer is minutes.
CONNECT_TIMEOUT_S = 5.0
# Ray turns the node address 127.0.0.1 into the machine's network address unless this is 0, and
# its gRPC servers listen on every interface unless the node address is 127.0.0.1. Ray reads it
# once, when it is first imported, and its processes inherit it.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# The HTTP/2 client preface and an empty SETTINGS frame: a gRPC server answers with its SETTINGS.
_HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_HTTP2_SETTINGS = 0x4
AUTH_MODE_ENV = "RAY_AUTH_MODE"
_HEADS_TOKEN = "`ray get-auth-token` there prints it; `ray start --head` keeps it in ~/.ray/auth_token"
_CHECK_HEAD = "check that the head is running (`ray status` on it) and that this is the address `ray start --head` printed"


@dataclass(frozen=True)
class ClusterAddress:
    """A Ray cluster to join: its address as given and where it came from."""

    address: str
    source: str  # "--address" or "RAY_ADDRESS"


def resolve_address(cli_address: str | None) -> ClusterAddress | None:
    """The cluster the run joins, or None for a local Ray of its own. `cli_address` is what the
    CLI holds, which defaults to $RAY_ADDRESS: equal to it means the address came from there.
    An explicit address wins over RAY_ADDRESS, as in ray.init; an empty RAY_ADDRESS is unset."""
    from_env = os.environ.get("RAY_ADDRESS") or None
    if cli_address and cli_address != from_env:
        return ClusterAddress(cli_address, "--address")
    return ClusterAddress(from_env, "RAY_ADDRESS") if from_env else None


def keep_local_ray_on_loopback() -> None:
    """Make the local Ray that `connect(None)` starts listen on 127.0.0.1 only. Call it before
    ray is first imported; a value the user set is kept. What is set here is taken back once
    `connect` has started Ray (its processes have it by then): left in this process, it would
    make a `ray start --address` launched from it later refuse to join a cluster."""
    environment.setenv(LOOPBACK_ENV, "0", keep_users=True)


def connect(cluster: ClusterAddress | None, num_cpus: int | None = None) -> bool:
    """Join `cluster`, or start a local Ray when it is None, unless this process already has;
    True when Ray was started or joined here (the caller then shuts it down).

    A local Ray is always a new one (Ray's address "local"): never a head that Ray's temp dir
    still names (`ray_current_cluster` outlives a head that ended without `ray stop`), and
    never RAY_ADDRESS; it has no dashboard and listens on loopback (`keep_local_ray_on_loopback`).
    Joining first checks, within CONNECT_TIMEOUT_S, that the head answers, then that it accepts
    this machine's token where it requires one (`use_the_heads_auth`); an address that is
    malformed, finds no cluster or does not answer, and a token missing or refused, are a
    ConfigError naming the address and its source."""
    divert_logs("ray")  # Ray's and Tune's lines, from the token-auth warning of ray.init on, go to the run's ray.log
    return _connect(cluster, num_cpus)


def _connect(cluster: ClusterAddress | None, num_cpus: int | None) -> bool:
    """`connect`, Ray's logs diverted already."""
    import ray

    if ray.is_initialized():
        return False
    if cluster is None:
        try:
            _init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                  log_to_driver=False)
        finally:
            environment.put_back(LOOPBACK_ENV)
    else:
        hint = "; unset it to run on a local Ray" if cluster.source == "RAY_ADDRESS" else ""
        print(f"Joining the Ray cluster at {cluster.address} (from {cluster.source}{hint})", flush=True)
        use_the_heads_auth(cluster, check_head_answers(cluster, CONNECT_TIMEOUT_S))
        try:
            _init(address=cluster.address, log_to_driver=False)
        except ConnectionError as e:
            raise ConfigError(f"could not join the Ray cluster at {cluster.address} (from {cluster.source}): {e}. "
                              f"Fix: {_CHECK_HEAD}, or {_local_instead(cluster)}") from None
    tighten_auth_token()
    return True


class LocalRayStart:
    """A local Ray (`connect(None)`) started in a thread of its own, so that its start (seconds:
    its processes each import Ray) overlaps what the driver does meanwhile. Ray's logs are
    diverted here, in the calling thread, before the thread starts. Ray starts its processes to
    die with the thread that started them (PR_SET_PDEATHSIG), so that thread lives until
    `shut_down`."""

    def __init__(self) -> None:
        keep_local_ray_on_loopback()
        divert_logs("ray")
        self._started: bool | None = None
        self._error: BaseException | None = None
        self._ready, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray-start", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._started = _connect(None, None)
        except BaseException as error:  # noqa: BLE001 - raised in the driver's thread by `wait`
            self._error = error
        finally:
            self._ready.set()
        self._release.wait()
        if self._started:
            import ray

            ray.shutdown()

    def wait(self) -> bool:
        """`connect`'s answer once Ray has started; what kept it from starting is raised here."""
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return bool(self._started)

    def shut_down(self, wait: bool = True) -> None:
        """Ray, once started, shut down by the thread that started it; then the thread ends. With
        `wait` false the caller goes on meanwhile (Ray's shutdown takes seconds, which the
        analysis of a search that ended can use), and `join` waits for it."""
        self._ready.wait()
        self._release.set()
        if wait:
            self.join()

    def join(self) -> None:
        self._thread.join()


def _init(**kwargs) -> None:
    """ray.init, keeping this process's SIGTERM handler: ray.init installs its own (sys.exit(15))
    for good when called from the main thread, so a SIGTERM during ray.init arrives as that
    SystemExit and is handed to the kept handler as the signal it was. From another thread
    ray.init leaves the handlers alone."""
    import ray

    if threading.current_thread() is not threading.main_thread():
        ray.init(**kwargs)
        return
    kept = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(**kwargs)
    except SystemExit as e:
        if e.code == signal.SIGTERM and callable(kept):
            kept(signal.SIGTERM, None)
        raise
    finally:
        if kept is not None:
            signal.signal(signal.SIGTERM, kept)


def check_head_answers(cluster: ClusterAddress, timeout_s: float) -> str:
    """The head's HOST:PORT (ray:// kept; auto resolved as ray.init would); ConfigError unless
    a gRPC server, the head, answers there within timeout_s. ray.init alone would wait minutes on an address that does not answer
    (20 attempts of over 30 s each), and a SIGTERM meanwhile waits for the attempt to end."""
    target = cluster.address
    if target == "auto":
        from search.cluster.ray_contract import auto_address

        try:
            target = auto_address()
        except ConnectionError as e:
            raise ConfigError(f"{cluster.source} is auto, but Ray found no cluster to join ({e}). "
                              f"Fix: give the head's HOST:PORT, or {_local_instead(cluster)}") from None
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{cluster.source} is {cluster.address!r}; allowed: HOST:PORT of a Ray head (as "
                          f"`ray start --head` prints it), ray://HOST:PORT or auto. Fix: give one of these, or "
                          f"{_local_instead(cluster)}")
    problem = _no_answer(host.strip("[]"), int(port), timeout_s)
    if problem:
        raise ConfigError(f"the Ray head at {_shown(cluster, target)}, from {cluster.source}, {problem}. "
                          f"Fix: {_CHECK_HEAD}, or {_local_instead(cluster)}")
    return target


def use_the_heads_auth(cluster: ClusterAddress, target: str) -> None:
    """Speak the auth that the head at `target` (HOST:PORT) requires, through Ray's own settings.
    A head that `ray start --head` started finding a token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH
    or ~/.ray/auth_token, which a local ray.init writes) requires that token; ray.init sends it
    only with RAY_AUTH_MODE=token, which it never sets for an explicit address, and otherwise
    retries for about 20 s and fails without saying why. So where the head refuses this client
    and RAY_AUTH_MODE is unset, token mode is turned on for this process and the ones it starts,
    when this machine has a token. ConfigError when it has none, when RAY_AUTH_MODE says not to
    send one, or when the head refuses the one it has. ray:// (Ray Client) is left to Ray."""
    from search.cluster import ray_contract

    if target.startswith("ray://") or not ray_contract.head_refuses_this_client(target):
        return
    head = f"the Ray head at {_shown(cluster, target)}, from {cluster.source},"
    fix = (f"Fix: copy the token from the head node ({_HEADS_TOKEN}) to {_token_path()} here, or export "
           f"RAY_AUTH_TOKEN=<that token>, or {_local_instead(cluster)}")
    mode = os.environ.get(AUTH_MODE_ENV)
    if not ray_contract.has_auth_token():
        raise ConfigError(f"{head} requires an auth token and this machine has none (RAY_AUTH_TOKEN is unset and "
                          f"{_token_path()} does not exist). {fix}")
    if mode is not None and mode.lower() != "token":
        raise ConfigError(f"{head} requires an auth token, but {AUTH_MODE_ENV} is {mode!r} here, so none is sent. "
                          f"Fix: unset {AUTH_MODE_ENV} or set it to token")
    if mode is None:
        ray_contract.send_auth_token()
        if not ray_contract.head_refuses_this_client(target):
            return
    raise ConfigError(f"{head} refused this machine's auth token (from {_token_source()}): it is not the head's. "
                      f"Fix: replace it with the head's ({_HEADS_TOKEN}), or {_local_instead(cluster)}")


def _token_path() -> Path:
    """The file where Ray looks for this machine's auth token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def _token_source() -> str:
    """Where Ray takes the token from: RAY_AUTH_TOKEN before the file."""
    return "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else str(_token_path())


def _shown(cluster: ClusterAddress, target: str) -> str:
    return cluster.address if target == cluster.address else f"{cluster.address} ({target})"


def _no_answer(host: str, port: int, timeout_s: float) -> str | None:
    """Why no gRPC server answers at host:port within timeout_s; None when one does. A TCP
    connection alone proves little: the kernel accepts it for a head that is stopped or hung."""
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return None  # the head expects a TLS handshake first: the connection is all we check
            sock.sendall(_HTTP2_HELLO)
            frame = b""
            while len(frame) < 9:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(9 - len(frame))
                if not chunk:
                    break
                frame += chunk
    except TimeoutError:
        return f"did not answer within {timeout_s:g} s"
    except OSError as e:
        return f"cannot be reached ({e.strerror or e})"
    if len(frame) < 9 or frame[3] != _HTTP2_SETTINGS:
        return "answered, but not as a Ray head (no gRPC)"
    return None


def _local_instead(cluster: ClusterAddress) -> str:
    flag = "unset RAY_ADDRESS" if cluster.source == "RAY_ADDRESS" else "leave --address out"
    return f"{flag} to run on a local Ray"


def tighten_auth_token() -> None:
    """Ray 2.60 writes its cluster auth token readable by every user of the machine; make it owner-only."""
    path = _token_path()
    try:
        if path.stat().st_uid == os.getuid() and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            path.chmod(0o600)
    except FileNotFoundError:
        pass


def check_cluster_gpus(gpus_per_trial: float) -> None:
    """A trial asking for more GPUs than any node has would wait forever: bad input."""
    import ray

    largest = max((node["Resources"].get("GPU", 0) for node in ray.nodes() if node["Alive"]), default=0)
    if gpus_per_trial > largest:
        raise ConfigError(f"resources.gpus_per_trial is {gpus_per_trial} but the largest node of the Ray cluster has "
                          f"{largest:g} GPU(s); no trial could ever start. Fix: lower it, or add GPU nodes")


def trial_slots(gpus_per_trial: float, cpus_per_trial: int) -> int:
    """How many trials the Ray cluster can run at once, from its total resources: GPU slots
    where trials take GPUs (a node's CPUs permitting), else CPU slots. At least 1."""
    import ray

    total = ray.cluster_resources()
    slots = math.floor(total.get("CPU", 1) / cpus_per_trial + 1e-9)
    if gpus_per_trial > 0:
        slots = min(slots, math.floor(total.get("GPU", 0) / gpus_per_trial + 1e-9))
    return max(1, slots)
