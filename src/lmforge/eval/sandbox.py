"""Run untrusted, model-generated Python in a throwaway subprocess behind several independent layers.

Code evaluation executes whatever a model wrote. A small model will write infinite loops, huge allocations,
`os.remove` and `shutil.rmtree` calls, network requests and fork loops by accident; `run_python` keeps those from
hanging the evaluation or touching the host. Each layer stops a class of accident on its own, so one layer's gap
is covered by another:

1. A fresh temporary directory per run is the working directory, HOME and TMPDIR, and is deleted afterwards, so
   files a program writes never outlive the run. The program reaches the child through `program.py` in it, not argv.
2. An isolated interpreter, `python -I -S -B`: no PYTHON* variables, no user or site packages (so only the
   standard library can be imported), no bytecode written; the environment holds only PATH, LANG, HOME and TMPDIR,
   so no token or credential of ours is inherited.
3. Its own session and process group (`start_new_session`). After the program exits, and when it times out, the
   whole group gets SIGKILL (while the leader is still an unreaped zombie, so its group id cannot be reused), and
   the leader is always reaped: no child or grandchild outlives a run.
4. Resource limits (setrlimit, in `preexec_fn`): address space (`memory_mb`, so a huge allocation raises
   MemoryError instead of swapping the host), CPU seconds (ceil(timeout) + 1: a backstop should the wall-clock
   timer fail), file size (16 MiB), no core dumps, 64 open files, and RLIMIT_NPROC for non-root users (the kernel
   ignores RLIMIT_NPROC for root, so it is not set there and nothing relies on it).
5. Namespaces, where the kernel allows them (`unshare` through ctypes, in `preexec_fn`): a new user and network
   namespace, whose only interface is a loopback that is down, so nothing can be reached; and a new mount
   namespace in which every mount is made read-only (`mount_setattr`, Linux >= 5.12) except a bind mount of the
   temporary directory, so the kernel refuses writes anywhere else even when running as root. When `unshare` is
   refused (for example in a container without user namespaces) the run goes on without them; each result
   records what was applied (`network_isolated`, `readonly_fs`), and `isolation_probe()` reports it once.
6. A PEP 578 audit hook, installed by a prelude in the child before the program runs, raises PermissionError for
   process creation, signals to other processes, network access, raising resource limits, loading ctypes / cffi or
   a fresh copy of _posixsubprocess (they act without raising audit events; the loaded _posixsubprocess has its
   fork_exec replaced), walking the garbage collector (the way to reach the hook's state), and every file change
   outside the temporary directory (open for writing, remove, rename, mkdir, rmdir, rmtree, copy, move, chmod,
   chown, link, symlink, truncate, utime, chdir, sqlite databases). Reading files is allowed: the standard library
   must import. The first refusal is reported to us through a pipe (and reads "PermissionError: lmforge sandbox:
   ..." on stderr), and the run's status is "blocked" even if the program caught the error. The hook keeps its
   state in closure cells and calls only C functions captured at install time, so monkeypatching os or posixpath
   does not change its answers.

This is defence in depth for code from our own models, not a security boundary against a determined attacker:
a kernel or CPython bug, a crafted code object, a race between the hook's path check and the system call (another
thread swapping a symlink, or a path object whose `__fspath__` answers differently each call), or an environment
without namespaces can get past it. For untrusted code from other people run it in a container or VM with no
network, gVisor (runsc), firejail / bubblewrap or nsjail with a seccomp filter, as an unprivileged user.
"""

from __future__ import annotations

import ctypes
import inspect
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from functools import cache, partial

PROGRAM_FILE = "program.py"
FILE_SIZE_LIMIT = 16 << 20
OPEN_FILES_LIMIT = 64
NPROC_LIMIT = 256  # for non-root users; counts all of that user's processes and threads
DRAIN_GRACE_S = 1.0  # how long to wait for pipes to close once the process group is dead
BLOCK_MESSAGE = b"PermissionError: lmforge sandbox: "  # how a refusal by the audit hook reads on stderr

# The audit-hook policy (CPython 3.11 event names, checked against the audit events table and by experiment).
PROCESS_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
    "subprocess.Popen", "pty.spawn",
})
NETWORK_EVENTS = frozenset({
    "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto", "socket.sendmsg",
    "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo", "socket.sethostname",
})
ALWAYS_BLOCKED = frozenset({
    "resource.setrlimit", "resource.prlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
})
BLOCKED_IMPORTS = frozenset({
    "ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess", "_posixshmem", "_xxsubinterpreters",
    "_testcapi", "_testinternalcapi",
})
# Events that change the file system: event -> ((index of a path argument, index of its dir_fd or None), ...).
PATH_EVENTS = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),), "os.chmod": ((0, 2),), "os.chown": ((0, 3),),
    "os.truncate": ((0, None),), "os.utime": ((0, 3),), "os.chdir": ((0, None),), "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),), "shutil.copyfile": ((1, None),),
    "shutil.copymode": ((1, None),), "shutil.copystat": ((1, None),), "shutil.copytree": ((1, None),),
    "shutil.move": ((0, None), (1, None)), "shutil.chown": ((0, None),), "shutil.unpack_archive": ((1, None),),
    "sqlite3.connect": ((0, None),),
}


@dataclass
class SandboxResult:
    status: str  # passed | failed | timeout | error | blocked | memory
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    blocked_event: str | None = None  # the first event the audit hook refused
    network_isolated: bool = False  # the run had its own network namespace
    readonly_fs: bool = False  # everything but the temporary directory was mounted read-only
    truncated: bool = False  # stdout or stderr was longer than max_output_bytes


def _guard(root, report_fd, policy):
    """Runs in the child only (its source is the prelude): install the audit hook, return the program to exec.

    No annotations and no module-level names: this function is sent as source to an interpreter that has neither.
    """
    import posix
    import sys

    process, network, always, imports, path_events = policy
    fspath, lstat, stat, readlink, getcwd, getpid, write = (
        posix.fspath, posix.lstat, posix.stat, posix.readlink, posix.getcwd, posix.getpid, posix.write)
    to_str, decode, int_repr, type_, len_ = str.__str__, bytes.decode, int.__repr__, type, len
    str_t, bytes_t, int_t, oserror, denied = str, bytes, int, OSError, PermissionError
    write_flags = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    reported = []

    def block(what):
        if not reported:
            reported.append(what)
            try:
                write(report_fd, ("blocked " + what + "\n").encode("utf-8", "replace"))
            except oserror:
                pass
        raise denied("lmforge sandbox: " + what + " is not allowed")

    def text(p):
        if type_(p) is not str_t and type_(p) is not bytes_t:
            p = fspath(p)
        return decode(p, "utf-8", "surrogateescape") if type_(p) is bytes_t else to_str(p)

    def real(path):  # posixpath.realpath, but only with the captured C functions
        todo = path.split("/")
        todo.reverse()
        out, hops = "", 0
        while todo:
            name = todo.pop()
            if name == "" or name == ".":
                continue
            if name == "..":
                out = out[: out.rfind("/")]
                continue
            cand = out + "/" + name
            try:
                mode = lstat(cand).st_mode
            except oserror:
                mode = 0
            if mode & 0o170000 != 0o120000:
                out = cand
                continue
            hops += 1
            if hops > 40:
                return "/<symlink loop>"
            target = readlink(cand)
            if target.startswith("/"):
                out = ""
            parts = target.split("/")
            parts.reverse()
            todo.extend(parts)
        return out or "/"

    def resolve(p, dir_fd=None):
        if type_(p) is int_t:  # a file descriptor: where it points
            return readlink("/proc/self/fd/" + int_repr(p))
        p = text(p)
        if not p.startswith("/"):
            base = getcwd() if dir_fd is None or dir_fd < 0 else readlink("/proc/self/fd/" + int_repr(dir_fd))
            p = base + "/" + p
        return real(p)

    def inside(p):
        return p == root or p.startswith(root + "/")

    def is_dir(p):
        try:
            return stat(p).st_mode & 0o170000 == 0o040000
        except oserror:
            return False

    def check_open(path, mode, flags):
        if type_(path) is int_t:
            return
        writing = (type_(flags) is int_t and flags & write_flags) or (
            type_(mode) is str_t and ("w" in mode or "a" in mode or "x" in mode or "+" in mode))
        if writing:
            p = resolve(path)
            if not inside(p) and p != "/dev/null":
                block("open for writing " + p)
        elif mode is None:
            # os.open of a directory outside: the fd could be the dir_fd of a write the open event does not show.
            p = resolve(path)
            if not inside(p) and is_dir(p):
                block("os.open of directory " + p)

    def check_paths(event, args):
        for i, d in path_events[event]:
            if i < len_(args) and args[i] is not None:
                if event == "sqlite3.connect" and type_(args[i]) is str_t and args[i] in ("", ":memory:"):
                    continue
                p = resolve(args[i], args[d] if d is not None and d < len_(args) else None)
                if not inside(p):
                    block(event + " " + p)
        if event == "os.symlink":  # the link's target must stay inside too
            target = text(args[0])
            if not target.startswith("/"):
                link = resolve(args[1], args[2])
                target = link[: link.rfind("/")] + "/" + target
            if not inside(real(target)):
                block(event + " to " + target)

    def hook(event, args):
        if event in always or event in process or event in network or event.startswith("ctypes."):
            block(event)
        elif event == "os.kill" or event == "os.killpg":
            if args[0] != getpid():
                block(event)
        elif event == "socket.__new__":
            if args[1] != posix_af_unix:
                block(event)
        elif event == "import":
            name = to_str(args[0])  # a str subclass could answer partition() with anything
            if name.partition(".")[0] in imports:
                block("import " + name)
        elif event == "open":
            check_open(args[0], args[1], args[2])
        elif event in path_events:
            check_paths(event, args)

    def refuse_fork_exec(*args, **kwargs):
        block("_posixsubprocess.fork_exec")

    posix_af_unix = 1  # socket.AF_UNIX on Linux; importing socket here would cost every run
    # fork_exec starts processes without an audit event. Replace it in the one loaded copy, so `import subprocess`
    # (and asyncio) still work, and refuse any fresh load of the module (the "import" event below).
    import _posixsubprocess
    _posixsubprocess.fork_exec = refuse_fork_exec
    with open(root + "/program.py", encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    main = type_(sys)("__main__")
    main.__file__ = "program.py"
    sys.modules["__main__"] = main
    sys.argv[:] = ["program.py"]
    sys.addaudithook(hook)
    return code, main.__dict__


_POLICY = (PROCESS_EVENTS, NETWORK_EVENTS, ALWAYS_BLOCKED, BLOCKED_IMPORTS, PATH_EVENTS)
_PRELUDE = (
    "import sys\n"
    + textwrap.dedent(inspect.getsource(_guard))
    + f"_code, _globals = _guard(sys.argv[1], int(sys.argv[2]), {_POLICY!r})\n"
    + "del _guard\n"
    + "exec(_code, _globals)\n"
)


# --- kernel namespaces, applied in preexec_fn (the forked child, before exec) ---

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
_UNSHARE_TRIES = (_CLONE_NEWUSER | _CLONE_NEWNET | _CLONE_NEWNS, _CLONE_NEWUSER | _CLONE_NEWNET, _CLONE_NEWNET)
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 1 << 18
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 1
_PR_SET_PDEATHSIG = 1


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.unshare.argtypes = [ctypes.c_int]
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
        libc.syscall.restype = ctypes.c_long
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()
# Built here, not in the child: preexec_fn should do as little as possible between fork and exec.
_SET_RDONLY = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
_CLEAR_RDONLY = _MountAttr(0, _MOUNT_ATTR_RDONLY, 0, 0)


def _mount_setattr(path: bytes, attr: _MountAttr) -> bool:
    assert _LIBC is not None
    return _LIBC.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(path),
                         ctypes.c_uint(_AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))) == 0


def _readonly_except(root: bytes) -> bool:
    """In a fresh mount namespace: every mount read-only, then `root` (bind-mounted onto itself) writable again."""
    assert _LIBC is not None
    if _LIBC.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:  # never propagate to the host
        return False
    if _LIBC.mount(root, root, None, _MS_BIND | _MS_REC, None) != 0 or not _mount_setattr(b"/", _SET_RDONLY):
        return False
    if _mount_setattr(root, _CLEAR_RDONLY):
        return True
    _mount_setattr(b"/", _CLEAR_RDONLY)  # a sandbox that cannot write its own directory is no use
    return False


def _unshare(root: bytes) -> tuple[bool, bool]:
    """(network isolated, file system read-only outside root); each is False when the kernel refuses."""
    if _LIBC is None:
        return False, False
    for flags in _UNSHARE_TRIES:
        if _LIBC.unshare(flags) == 0:
            return True, bool(flags & _CLONE_NEWNS) and _readonly_except(root)
    return False, False


def _child_setup(root: bytes, report_fd: int, limits: list[tuple[int, int, int]]) -> None:
    """preexec_fn: namespaces, then limits, then report what was applied. No locks, no logging: we are post-fork."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the thread that started us
    net, readonly = _unshare(root)
    os.chdir(root)  # through the new writable bind mount, not the read-only one underneath
    for res, soft, hard in limits:
        resource.setrlimit(res, (soft, hard))
    os.write(report_fd, b"isolation net=%d fs=%d\n" % (net, readonly))


def _limits(timeout_s: float, memory_mb: int) -> list[tuple[int, int, int]]:
    cpu = math.ceil(timeout_s) + 1
    wanted = [
        (resource.RLIMIT_AS, memory_mb << 20, memory_mb << 20),
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
        (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT, FILE_SIZE_LIMIT),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NOFILE, OPEN_FILES_LIMIT, OPEN_FILES_LIMIT),
    ]
    if os.geteuid() != 0:
        wanted.append((resource.RLIMIT_NPROC, NPROC_LIMIT, NPROC_LIMIT))
    out = []
    for res, soft, hard in wanted:
        cap = resource.getrlimit(res)[1]  # an unprivileged process cannot raise its hard limit
        if cap != resource.RLIM_INFINITY:
            soft, hard = min(soft, cap), min(hard, cap)
        out.append((res, soft, hard))
    return out


def _child_env(root: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("PATH", "LANG") if k in os.environ}
    return env | {"HOME": root, "TMPDIR": root}


# --- running and collecting ---


class _Capture:
    """The first `limit` bytes of a stream, its last 4 KiB (where a traceback ends) and its total size."""

    def __init__(self, limit: int) -> None:
        self.limit, self.head, self.tail, self.total = limit, bytearray(), b"", 0

    def add(self, data: bytes) -> None:
        if len(self.head) < self.limit:
            self.head += data[: self.limit - len(self.head)]
        self.tail = (self.tail + data)[-4096:]
        self.total += len(data)


def _exited(pid: int) -> bool:
    """True once the child has exited; it stays a zombie (WNOWAIT) so its process group id stays ours."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(proc: subprocess.Popen, timeout_s: float, limit: int) -> tuple[_Capture, _Capture, bool, float]:
    """Read stdout/stderr until the process exits or times out; then kill its group and drain. Reaps it."""
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Capture(limit), _Capture(limit)
    caps = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    sel = selectors.DefaultSelector()
    for fd in caps:
        sel.register(fd, selectors.EVENT_READ)
    start = time.monotonic()
    ended: float | None = None
    timed_out = False
    while True:
        now = time.monotonic()
        if ended is None:
            exited = _exited(proc.pid)
            if exited or now >= start + timeout_s:
                timed_out, ended = not exited, now
                _kill_group(proc.pid)  # stray children too, so the pipes close
        if ended is not None and (not sel.get_map() or now >= ended + DRAIN_GRACE_S):
            break
        if not sel.get_map():
            time.sleep(0.002)
            continue
        for key, _ in sel.select(timeout=0.01):
            data = os.read(key.fd, 1 << 16)
            if data:
                caps[key.fd].add(data)
            else:
                sel.unregister(key.fd)
    sel.close()
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    return out, err, timed_out, ended - start


def _read_report(fd: int) -> dict[str, str]:
    """The child's report lines: 'isolation net=1 fs=1' from preexec_fn, 'blocked EVENT' from the audit hook."""
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 1 << 16)
    except BlockingIOError:
        data = b""
    report: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(" ")
        report.setdefault(key, value)
    return report


def _blocked_on_stderr(err: _Capture) -> str | None:
    """The hook's PermissionError in a traceback: the fallback should the program have closed the report pipe."""
    for data in (err.tail, bytes(err.head)):
        i = data.rfind(BLOCK_MESSAGE)
        if i >= 0:
            return data[i + len(BLOCK_MESSAGE) :].split(b" is not allowed")[0].decode("utf-8", "replace")
    return None


def _status(returncode: int, timed_out: bool, blocked: bool, stderr_tail: bytes) -> str:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if blocked:
        return "blocked"
    if returncode == 0:
        return "passed"
    lines = stderr_tail.decode("utf-8", "replace").strip().splitlines()
    if lines and lines[-1].startswith("MemoryError"):
        return "memory"
    return "error" if returncode < 0 else "failed"  # killed by a signal (a crash) vs. an exception / exit(1)


def _remove_tree(path: str) -> None:
    def make_writable(func, p, _exc):  # the program may have taken permissions away inside its directory
        os.chmod(os.path.dirname(p), 0o700)
        func(p)

    shutil.rmtree(path, onerror=make_writable)


def run_python(
    program: str, *, timeout_s: float = 5.0, memory_mb: int = 512, max_output_bytes: int = 1 << 16
) -> SandboxResult:
    """Run `program` in a fresh sandboxed interpreter; "passed" means it exited with code 0."""
    if timeout_s <= 0 or memory_mb <= 0 or max_output_bytes < 0:
        raise ValueError(f"need timeout_s > 0, memory_mb > 0, max_output_bytes >= 0; got {timeout_s}, "
                         f"{memory_mb}, {max_output_bytes}")
    root = os.path.realpath(tempfile.mkdtemp(prefix="lmforge-sandbox-"))
    try:
        # surrogatepass: a lone surrogate reaches the child, which fails to decode it (status "failed"), not us.
        with open(os.path.join(root, PROGRAM_FILE), "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(program)
        return _run_in(root, timeout_s, memory_mb, max_output_bytes)
    finally:
        _remove_tree(root)


def _run_in(root: str, timeout_s: float, memory_mb: int, max_output_bytes: int) -> SandboxResult:
    report_r, report_w = os.pipe()
    setup = partial(_child_setup, root.encode(), report_w, _limits(timeout_s, memory_mb))
    cmd = [sys.executable, "-I", "-S", "-B", "-c", _PRELUDE, root, str(report_w)]
    try:
        proc = subprocess.Popen(
            cmd, cwd=root, env=_child_env(root), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, pass_fds=(report_w,), start_new_session=True, preexec_fn=setup,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        os.close(report_r)
        return SandboxResult("error", None, "", f"lmforge sandbox: could not start the interpreter: {exc}", 0.0)
    finally:
        os.close(report_w)
    out, err, timed_out, seconds = _collect(proc, timeout_s, max_output_bytes)
    report = _read_report(report_r)
    os.close(report_r)
    isolation = report.get("isolation", "")
    blocked = report.get("blocked") or _blocked_on_stderr(err)
    return SandboxResult(
        status=_status(proc.returncode, timed_out, blocked is not None, err.tail),
        returncode=proc.returncode,
        stdout=out.head.decode("utf-8", "replace"),
        stderr=err.head.decode("utf-8", "replace"),
        seconds=seconds,
        blocked_event=blocked,
        network_isolated="net=1" in isolation,
        readonly_fs="fs=1" in isolation,
        truncated=out.total > max_output_bytes or err.total > max_output_bytes,
    )


@cache
def isolation_probe() -> dict[str, bool]:
    """Which kernel layers this machine grants the sandbox (runs one empty program, once per process)."""
    r = run_python("pass", timeout_s=30)
    return {"network_namespace": r.network_isolated, "readonly_fs": r.readonly_fs, "ran": r.status == "passed"}
