"""A shared trainer in a process that the driver starts before Ray, so that the trainer's imports
and model load overlap Ray's start instead of following it.

A Ray actor exists only once Ray is up, and a trainer's own start (torch, transformers and PEFT
imported, the weights loaded, the step compiled and captured) takes seconds more after that, one
part after the other in one interpreter (bench/results/h100-2026-12-07-sitting14/README.md has the
parts, before and after this module). A new run on a local Ray therefore
starts one trainer's process first thing (`TrainerHost`: it imports torch beside the driver's own
imports), tells it the model once its plan is made (`BaseSpec`), and lets it take the GPU once its
input is checked (bad input exits 2 with no GPU's memory taken), telling it then the trainer to
make (`TrainerArgs`): so the weights' load and the pack's compiling go on while Ray starts. The
run's Ray actor of that trainer (`Trainer`) hands its calls to it over a local socket. A process outside Ray is not Ray's to
place: it takes the GPU that Ray gives the actor only because the driver gave it the same one, and
an actor on any other GPU, or made again after either process died, or on a cluster or a resumed
run (no host), holds a `SharedTrainer` itself.

The host lives as long as its driver and its actor: it exits when the driver's pipe to it closes
(the driver ended, however it ended) and when the actor that took it lets go (killed at the run's
end, or died). An actor whose host died ends itself, so that Ray restarts it (with a trainer of
its own) and its clients fail as they would with the trainer in the actor.

This module imports no torch where `Trainer` is made: the actor's process stays light."""

from __future__ import annotations

import faulthandler
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

from trainables.config import BaseSpec, TrialSetup

log = logging.getLogger(__name__)
# What a host answers: the trainer's methods that its actor serves, by name.
CALLS = ("startup", "time_spent", "free_slots", "open", "next_report", "release", "stop")
CONSTRUCT = "construct"


# How long an actor waits for a host whose process runs to open its socket: the host opens it
# first thing, a fraction of a second after its start.
OPENING_S = 60.0


@dataclass(frozen=True)
class HostAddress:
    """Where the actor finds the host: its Unix socket, the key that both ends hold, the GPU the
    host uses as Ray names it in CUDA_VISIBLE_DEVICES ("" on a machine without one), and its
    process, whose end tells a waiting actor that no socket will open."""

    socket: str
    authkey: bytes
    gpu: str
    pid: int = 0

    def connect(self) -> Connection:
        """A connection to the host, waiting while its process runs and its socket is not open
        yet; OSError once the process is gone."""
        deadline = time.monotonic() + OPENING_S
        while True:
            try:
                return Client(self.socket, family="AF_UNIX", authkey=self.authkey)
            except (FileNotFoundError, ConnectionRefusedError):
                if not _running(self.pid) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


@dataclass(frozen=True)
class TrainerArgs:
    """What a `SharedTrainer` is made with; the host makes it once the driver's `go` gives them,
    and serves it to an actor that asks for the same."""

    setup: TrialSetup
    capacity: int
    share: float


def _running(pid: int) -> bool:
    """Whether process `pid` runs; its parent, the driver, has not yet reaped one that ended (a
    zombie), which does not run."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (macOS): what kill answered
        return True


def gpu_likely() -> bool:
    """Whether this machine has an NVIDIA GPU that CUDA_VISIBLE_DEVICES leaves visible, told before
    torch is imported (which takes a second): NVIDIA's driver's device file. A wrong guess costs a
    process that imports torch and is let go, or a trainer's process started later."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists()


def visible_gpu(cuda: bool) -> str:
    """The first GPU this process sees, as CUDA_VISIBLE_DEVICES names it (Ray numbers a machine's
    GPUs from that list, or from 0 where it is not set); "" without CUDA."""
    if not cuda:
        return ""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "0" if listed is None else listed.split(",")[0].strip()


class TrainerHost:
    """The driver's side: the host process, started at once (it imports torch, transformers and
    PEFT meanwhile); `load` tells it the model and the GPU, `go` that the driver's input is checked, so that it may take the
    GPU's memory; its output kept in a file until `close` moves it into the run's logs."""

    def __init__(self, cpu_threads: int, quantization: str, trust_remote_code: bool):
        """`quantization` and `trust_remote_code` as the model's config says: whether the host may
        leave bitsandbytes out of its imports of transformers and PEFT, which it makes at once."""
        self._dir = Path(tempfile.mkdtemp(prefix="lora-search-host-"))
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(cpu_threads))  # as Ray sets a worker's
        # the host imports this package as the driver does, from where it is, installed or not
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self._log = self._dir / "host.log"
        with open(self._log, "wb") as out:
            self._process = subprocess.Popen([sys.executable, "-m", "trainables.host"], stdin=subprocess.PIPE,
                                             stdout=out, stderr=subprocess.STDOUT, env=env)
        self.address: HostAddress | None = None
        self._send((quantization, trust_remote_code))

    @classmethod
    def for_model(cls, spec: BaseSpec, gpu: str, trainer: TrainerArgs | None = None) -> TrainerHost:
        """A host told at once to load `spec` on `gpu` (and make `trainer`), with nothing left to check."""
        host = cls(spec.cpu_threads, spec.quantization, spec.trust_remote_code)
        host.load(spec, gpu)
        host.go(trainer)
        return host

    def load(self, spec: BaseSpec, gpu: str, warm: bool = False) -> HostAddress:
        """Tell the host the model of `spec` and the GPU (`visible_gpu`, "" for none) its actor will
        have: it imports transformers and PEFT meanwhile, and waits for `go` to load the weights;
        with `warm` (its pack will compile), it makes inductor's one-time setup while it waits."""
        self.address = HostAddress(str(self._dir / "socket"), os.urandom(32), gpu, self._process.pid)
        self._send((spec, self.address, warm))
        return self.address

    def go(self, trainer: TrainerArgs | None = None) -> None:
        """The driver's input is checked: the host may take the GPU's memory and load the weights,
        and make `trainer` at once where given, before its actor asks (which Ray's start delays)."""
        self._send(trainer)

    def _send(self, message: object) -> None:
        # the host's stdin stays open while the driver lives: its end is the host's signal to exit
        try:
            self._process.stdin.write(pickle.dumps(message))
            self._process.stdin.flush()
        except OSError:  # the host is gone: its actor finds it gone and holds the trainer itself
            pass

    @property
    def pid(self) -> int:
        return self._process.pid

    def running(self) -> bool:
        return self._process.poll() is None

    def close(self, keep_log: Path | None = None) -> None:
        """End the host (it exits when its pipe closes; killed if it has not within seconds) and
        append its output to `keep_log` where given."""
        try:
            self._process.stdin.close()
        except OSError:
            pass
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if keep_log is not None and self._log.exists() and self._log.stat().st_size:
            keep_log.parent.mkdir(parents=True, exist_ok=True)
            with open(keep_log, "ab") as kept:
                kept.write(self._log.read_bytes())
        shutil.rmtree(self._dir, ignore_errors=True)


class Trainer:
    """The run's Ray actor of a shared trainer (`SharedTrainer`'s calls, `CALLS`): answered by the
    trainer in `host` where that host uses this actor's GPU and takes it (it takes one actor, once),
    else by a `SharedTrainer` made here."""

    def __init__(self, setup: TrialSetup, capacity: int, share: float = 1.0, host: HostAddress | None = None):
        self._own = None
        self._address = None
        self._calls = threading.local()  # a connection per thread of the actor: calls wait side by side
        if host is not None and host.gpu == visible_gpu(host.gpu != ""):
            self._address = self._taken(host, TrainerArgs(setup, capacity, share))
        if self._address is None:
            from trainables.shared import SharedTrainer

            self._own = SharedTrainer(setup, capacity, share)

    def _taken(self, host: HostAddress, args: TrainerArgs) -> HostAddress | None:
        """`host`, once its trainer is constructed for this actor; None where the host is gone or
        already serves another. What the construction raised is raised here, as the actor's."""
        try:
            control = host.connect()
            control.send((CONSTRUCT, (args,)))
            status, value = control.recv()
        except (OSError, EOFError) as e:  # gone: this actor was made again after it died, or it after the actor
            log.warning("the shared trainer's process that the driver started is gone (%s: %s); this actor holds "
                        "the trainer itself", type(e).__name__, e)
            return None
        if status == "refused":  # it took an actor before this one, which Ray made again after it died
            control.close()
            log.warning("the shared trainer's process that the driver started serves another actor, or made "
                        "another trainer than this actor's (%s); this actor holds the trainer itself", value)
            return None
        if status == "raised":
            raise value
        self._control = control  # held open while this actor lives: its end tells the host to exit
        return host

    def _call(self, name: str, *args):
        if self._own is not None:
            return getattr(self._own, name)(*args)
        connection = getattr(self._calls, "connection", None)
        try:
            if connection is None:
                connection = self._calls.connection = self._address.connect()
            connection.send((name, args))
            status, value = connection.recv()
        except (OSError, EOFError) as e:
            # the host died with the pack: this actor ends too, so that Ray makes it again (with a
            # trainer of its own) and every client's call fails as a trainer's death fails it
            log.error("the shared trainer's process ended (%s: %s); its actor ends too", type(e).__name__, e)
            logging.shutdown()
            os._exit(1)
        if status == "raised":
            raise value
        return value

    def startup(self) -> dict[str, float]:
        return self._call("startup")

    def time_spent(self) -> dict[str, dict]:
        return self._call("time_spent")

    def free_slots(self) -> int:
        return self._call("free_slots")

    def open(self, trial_id: str, config: dict, files: dict[str, bytes] | None,
             client: tuple[float, float] | None = None) -> str | None:
        return self._call("open", trial_id, config, files, client)

    def next_report(self, trial_id: str):
        return self._call("next_report", trial_id)

    def release(self, trial_id: str, token: str | None = None) -> None:
        return self._call("release", trial_id, token)

    def stop(self) -> None:
        return self._call("stop")


class _Host:
    """The host process's side: the base model loaded (`loaded`), and one trainer made for the
    first actor that asks (`CONSTRUCT`), whose calls it then answers, each connection in a thread."""

    def __init__(self) -> None:
        self.ready = threading.Event()  # set once `made` is: the model loaded, and the driver's trainer made
        self.loaded = None  # LoadedBase, or what loading it raised
        self.args: TrainerArgs | None = None  # the trainer the driver's go asked for, if any
        self.made: tuple[str, object] | None = None  # what making that trainer answered (`make`)
        self.trainer = None
        self.taken = False
        self.lock = threading.Lock()

    def accept(self, listener: Listener) -> None:
        while True:
            try:
                connection = listener.accept()
            except (OSError, EOFError, AuthenticationError):  # a caller without the key, or gone mid-handshake
                continue
            threading.Thread(target=self.serve, args=(connection,), daemon=True).start()

    def serve(self, connection: Connection) -> None:
        control = False
        while True:
            try:
                name, args = connection.recv()
            except (OSError, EOFError):
                if control:  # the actor that took this host is gone: so is the host
                    os._exit(0)
                return
            if name == CONSTRUCT:
                with self.lock:
                    refused, self.taken = self.taken, True
                if refused:
                    _send(connection, "refused", "it serves another actor")
                    continue
                control = True
                answer = self.construct(*args)
                _send(connection, *answer)
                if answer[0] == "raised":  # nothing to serve: the actor fails to start
                    os._exit(1)
                continue
            if name not in CALLS or self.trainer is None:
                _send(connection, "raised", RuntimeError(f"a shared trainer's host has no call {name!r} now"))
                continue
            try:
                _send(connection, "returned", getattr(self.trainer, name)(*args))
            except Exception as e:  # noqa: BLE001 - the caller's: raised there as the trainer raised it
                _send(connection, "raised", e)

    def construct(self, args: TrainerArgs) -> tuple[str, object]:
        """The answer to the actor's CONSTRUCT: the trainer made at the driver's go where it is the
        one the actor asks for, else one made now (a host that the driver gave no trainer)."""
        self.ready.wait()
        if self.args is None:
            return self.make(args)
        if self.args != args:  # never from this package's driver: the actor makes its own, this process goes
            threading.Timer(1.0, os._exit, (0,)).start()
            return "refused", f"it made a trainer of {self.args}, the actor asks for one of {args}"
        return self.made

    def make(self, args: TrainerArgs) -> tuple[str, object]:
        from trainables.shared import SharedTrainer

        if isinstance(self.loaded, BaseException):
            return "raised", self.loaded
        try:
            self.trainer = SharedTrainer(args.setup, args.capacity, args.share, loaded=self.loaded)
        except Exception as e:  # noqa: BLE001 - the actor's constructor raises it
            return "raised", e
        finally:
            self.loaded = None  # the trainer holds the model now, or nothing does
        return "returned", None


def _send(connection: Connection, status: str, value: object) -> None:
    """An answer; an exception that cannot travel (its class not importable at the other end, or
    not picklable) travels as a RuntimeError that names it."""
    if status == "raised":
        try:
            pickle.loads(pickle.dumps(value))
        except Exception:  # noqa: BLE001 - any failure to travel
            value = RuntimeError(f"{type(value).__name__}: {value}")
    try:
        connection.send((status, value))
    except (OSError, EOFError):  # the caller is gone: nobody to answer
        pass


def _exit_with_driver(go: threading.Event, host: _Host) -> None:
    """Set `go` when the driver says so, with the trainer it asks for in `host.args`, and exit once
    its pipe closes: the driver closed it, or it ended (a kill -9 too)."""
    try:
        host.args = pickle.load(sys.stdin.buffer)
        go.set()
        sys.stdin.buffer.read()
    except EOFError:
        pass
    os._exit(0)


def _import_model_code(quantization: str, trust_remote_code: bool) -> None:
    """transformers' and PEFT's imports, bitsandbytes left out where the model needs none, as a
    trainer's own load makes them (`trainables.shared.load_base`)."""
    from trainables.model import hide_bitsandbytes_unless_needed

    hide_bitsandbytes_unless_needed(quantization, trust_remote_code)
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401


def main() -> None:
    started = time.time()
    # the trainer's own account (its warnings, and what it made ahead) in its output, the run's trainer_host.log
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("trainables").setLevel(logging.INFO)
    # a crash in native code (a capture at the edge of the GPU's memory) leaves the Python stack in the log
    faulthandler.enable()
    # before the driver says what to load (it decides after its own imports): the same seconds for any model
    import torch  # noqa: F401

    try:
        quantization, trust_remote_code = pickle.load(sys.stdin.buffer)
        _import_model_code(quantization, trust_remote_code)
        spec, address, warm = pickle.load(sys.stdin.buffer)
    except EOFError:  # the run needs no host after all
        os._exit(0)
    if address.gpu:  # read at CUDA's first use, which comes after: the host's one GPU is its device 0, as an actor's is
        os.environ["CUDA_VISIBLE_DEVICES"] = address.gpu
    print(f"the shared trainer's process {os.getpid()}, started by the driver {os.getppid()} before Ray, loads "
          f"{spec.model_path}", file=sys.stderr, flush=True)
    listener = Listener(address.socket, family="AF_UNIX", authkey=address.authkey)
    host, go = _Host(), threading.Event()
    threading.Thread(target=_exit_with_driver, args=(go, host), name="driver", daemon=True).start()
    threading.Thread(target=host.accept, args=(listener,), name="accept", daemon=True).start()
    from trainables.shared import load_base

    try:
        host.loaded = load_base(spec, code_loaded_at=started, go=go, warm=warm)
    except Exception as e:  # noqa: BLE001 - raised by the actor that takes this host
        host.loaded = e
    # the driver's go, which says whether it asks for a trainer: a load that failed before it
    # came must not leave an actor's CONSTRUCT an answer never made
    go.wait()
    if host.args is not None:  # the pack prepares now, while Ray starts and the actor is made
        host.made = host.make(host.args)
    host.ready.set()
    threading.Event().wait()  # the threads above end the process


if __name__ == "__main__":
    main()
