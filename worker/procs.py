"""Child processes of a local cluster: started, watched and always stopped.

Each child runs in its own session (so a terminal's Ctrl-C reaches only the
launcher, which then stops the children in order) and is tied to the launcher's
life with Linux's parent-death signal: even if the launcher is killed with SIGKILL,
its children get SIGTERM and no orphan is left. The child arms that signal itself,
first thing (`python -m worker.procs PARENT MODULE ARGS...`, see `_adopt`), rather
than in a `preexec_fn`: a `preexec_fn` makes Python fork() instead of vfork(), and
fork() runs gRPC's pre-fork handler, which can wait forever on the launcher's own
gRPC threads (seen: a benchmark hung in `Popen` while it polled the servers).
Any other command (`start_command`, a user's training script) is run the same way,
`python -m worker.procs PARENT --exec CMD...`, which arms the signal and then exec()s
CMD (the signal survives exec). Output goes to one log file per child. `restart` runs a failed child again in place
(same name, log appended, the arguments it is given), which is how `ps-cluster`'s
restart policy works. A Ctrl-C (SIGINT) that arrives while a child is being spawned is
held until the child is registered, so that `stop` knows every process it must stop
(without that, an interrupt inside `Popen` left a just-forked child unknown to the
launcher). Not thread-safe; used from the launcher's main thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _guarded(args: list[str], command: bool = False) -> list[str]:
    """`python -m MODULE ...` as `python -m worker.procs THIS_PID MODULE ...`, and any
    `command` as `python -m worker.procs THIS_PID --exec COMMAND...` (Linux)."""
    if sys.platform != "linux":
        return args
    if command:
        return [sys.executable, "-m", "worker.procs", str(os.getpid()), "--exec", *args]
    if args[1:2] != ["-m"]:
        return args
    return [args[0], "-m", "worker.procs", str(os.getpid()), *args[2:]]


def _arm(parent: int, what: str) -> None:
    """In the child: SIGTERM when `parent` dies; exit at once if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)  # the running program's own libc (find_library forks ldconfig)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the launcher died before the signal was armed
        sys.exit(f"{what}: the launcher (pid {parent}) is gone; not starting")


def _adopt(parent: int, module: str, argv: list[str]) -> None:
    """In the child: SIGTERM when `parent` dies, then run `module` as __main__ with `argv`."""
    _arm(parent, module)
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _exec(parent: int, command: list[str]) -> None:
    """In the child: SIGTERM when `parent` dies, then become `command` (exit 127 if it cannot run)."""
    _arm(parent, command[0])
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        sys.stderr.write(f"cannot run {command[0]}: {exc.strerror or exc}\n")
        sys.exit(127)


@dataclass
class Child:
    name: str
    args: list[str]
    log: Path
    proc: subprocess.Popen
    env: dict[str, str] | None = None
    command: bool = False  # `args` is any command (start_command), not `python -m MODULE`
    wrap: tuple[str, ...] = ()  # runs the process inside this prefix (e.g. `ip netns exec NS`)

    def exited(self) -> int | None:
        return self.proc.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").rstrip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


class Children:
    """The launcher's children; `stop_all` is safe to call at any time, repeatedly."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.items: list[Child] = []

    def start(
        self, name: str, module: str, argv: list[str], env: dict[str, str] | None = None, wrap: tuple[str, ...] = ()
    ) -> Child:
        """Start `python -m module argv`; `wrap` is a prefix it runs under (one that execs it,
        keeping its pid, e.g. `ip netns exec NS`: the parent-death signal still reaches it)."""
        log = self.log_dir / f"{name}.log"
        args = [sys.executable, "-m", module, *argv]
        with _interrupts_held():
            child = Child(name, args, log, _spawn(args, log, env, wrap=wrap), env, wrap=tuple(wrap))
            self.items.append(child)
        return child

    def start_command(self, name: str, command: list[str], env: dict[str, str] | None = None) -> Child:
        """Start any command (e.g. `python train.py ...`) as a child, tied to the launcher like the others."""
        log = self.log_dir / f"{name}.log"
        with _interrupts_held():
            child = Child(name, list(command), log, _spawn(command, log, env, command=True), env, command=True)
            self.items.append(child)
        return child

    def restart(self, child: Child, args: list[str] | None = None) -> None:
        """Start `child` again (it must have exited) with `args` (default: its last ones)."""
        if child.proc.poll() is None:
            raise RuntimeError(f"{child.name} is still running")
        child.args = args or child.args
        with open(child.log, "ab") as out:
            out.write(f"--- restarted at {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(child.args[1:])}\n".encode())
        with _interrupts_held():
            child.proc = _spawn(child.args, child.log, child.env, command=child.command, wrap=child.wrap)

    def stop(self, children: list[Child], grace: float) -> None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL what is left (whole process groups:
        returns once no live process is left in any child's group, not only its leader)."""
        for c in children:
            if c.proc.poll() is None:
                _kill_group(c.proc, signal.SIGTERM)
        end = time.monotonic() + grace
        for c in children:
            try:
                c.proc.wait(timeout=max(0.05, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if c.proc.poll() is None:
                _kill_group(c.proc, signal.SIGKILL)
                c.proc.wait()
            while _group_members(c.proc.pid) and time.monotonic() < end:  # what the leader left behind
                time.sleep(0.02)
            if _group_members(c.proc.pid):
                _kill_group(c.proc, signal.SIGKILL)
                gone = time.monotonic() + 5
                while _group_members(c.proc.pid) and time.monotonic() < gone:
                    time.sleep(0.02)

    def stop_all(self, grace: float = 10.0) -> None:
        self.stop(self.items, grace)


@contextlib.contextmanager
def _interrupts_held():
    """Hold a SIGINT that arrives inside the block and deliver it (KeyboardInterrupt, or
    whatever handler was set) once the block is done; a no-op off the main thread or where
    SIGINT's handler was not set from Python."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)


def _spawn(
    args: list[str], log: Path, env: dict[str, str] | None, command: bool = False, wrap: tuple[str, ...] = ()
) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*wrap, *_guarded(args, command)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`, from /proc (empty where there is none)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:  # after "(comm)": state, ppid, pgrp
            members.append(int(entry.name))
    return members


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


if __name__ == "__main__":  # python -m worker.procs PARENT_PID (MODULE | --exec COMMAND) ARGS...
    if sys.argv[2] == "--exec":
        _exec(int(sys.argv[1]), sys.argv[3:])
    else:
        _adopt(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
