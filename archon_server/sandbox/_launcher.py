"""Sandbox launcher: runs as a separate process (stdlib only, started with ``python -I -S``).

It reads a JSON job on stdin, isolates itself, then runs the untrusted program and exits
with the program's status (128 + signal number when the program died of a signal; 125
when the launcher itself failed, with a ``SANDBOX-LAUNCHER:`` line on stderr).

Isolation, when the launcher runs as root and the kernel allows it ("namespaces" mode):
  * unshare network, mount, PID, IPC and UTS namespaces.  The new network namespace has
    only a loopback device that is down: nothing can be reached, not even 127.0.0.1 of
    the host.
  * In the new mount namespace every mount is remounted read-only; fresh size-limited
    tmpfs are mounted on /tmp, /var/tmp and /dev/shm.  The working directory is
    /tmp/work inside that tmpfs, so everything the program writes disappears with the
    namespace.  A fresh /proc is mounted for the new PID namespace.
  * A small init (this launcher, forked) is PID 1 of the new PID namespace and the
    program is its child; when the program exits or the caller kills the process group,
    init exits and the kernel kills every process left in the namespace (no orphans, no
    surviving fork-bomb children).
  * Privileges are dropped to a fresh, unused uid/gid with no supplementary groups, so
    RLIMIT_NPROC is enforced (the kernel exempts root from it) and no host file owned by
    another user is writable even where a mount could not be made read-only.
Fallback ("rlimits" mode, not root or namespaces refused): rlimits, a throwaway working
directory made by the caller, and an audit hook in the program's interpreter that refuses
socket creation/connection; a subprocess the program starts is not covered by the hook.  As root this
mode still drops to a fresh uid so that RLIMIT_NPROC holds.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

# Runs inside the program's interpreter before the program: optional socket audit hook,
# then the program itself as __main__ (tracebacks name main.py).
BOOTSTRAP = r"""
import sys
if %(block_net)r:
    def _no_net(event, args):
        if event in ("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto", "socket.sendmsg"):
            raise PermissionError("network access is disabled in the sandbox")
    sys.addaudithook(_no_net)
import os, runpy
sys.path.insert(0, os.getcwd())  # -I leaves the working directory off sys.path; programs may import helper files
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""


def _fail(msg: str) -> None:
    sys.stderr.write(f"SANDBOX-LAUNCHER: {msg}\n")
    sys.stderr.flush()
    os._exit(125)


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.unshare.argtypes = [ctypes.c_int]
    return libc


def _mount(libc: ctypes.CDLL, src: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _mount_points() -> list[tuple[str, str]]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            out.append((parts[4].replace("\\040", " "), parts[sep + 1]))
    return out


def _setup_filesystem(libc: ctypes.CDLL, tmpfs_mb: int) -> None:
    # Our mount changes must not propagate back to the host namespace.
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE, None)
    skip_types = {"proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "devtmpfs"}
    # Read-only everywhere (deepest first is not needed: bind-remount changes one mount's flags).
    for target, fstype in _mount_points():
        if fstype in skip_types or target.startswith(("/proc", "/sys")):
            continue
        try:
            _mount(libc, None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
        except OSError:
            pass  # uid drop still protects it (files are owned by someone else)
    for target in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(target):
            _mount(libc, "tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmpfs_mb}m,mode=1777")
    try:
        _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    except OSError:
        pass


def _set_limits(job: dict) -> None:
    def lim(res: int, value: int | None) -> None:
        if value is not None:
            resource.setrlimit(res, (value, value))

    cpu = job.get("cpu_s")
    if cpu is not None:
        # soft limit -> SIGXCPU (recorded as a timeout); hard limit one second later -> SIGKILL
        resource.setrlimit(resource.RLIMIT_CPU, (int(cpu), int(cpu) + 1))
    lim(resource.RLIMIT_AS, job.get("memory_bytes"))
    lim(resource.RLIMIT_FSIZE, job.get("file_bytes"))
    lim(resource.RLIMIT_NOFILE, job.get("max_files"))
    lim(resource.RLIMIT_CORE, 0)
    if job.get("nproc") is not None:
        lim(resource.RLIMIT_NPROC, job["nproc"])


def _exec_program(job: dict, workdir: str, block_net: bool) -> None:
    os.chdir(workdir)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
    }
    stdin_path = os.path.join(workdir, ".stdin")
    fd = os.open(stdin_path, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    argv = [job["python"], "-I", "-B", "-c", BOOTSTRAP % {"block_net": block_net}]
    os.execve(job["python"], argv, env)


def _write_files(job: dict, workdir: str, uid: int | None) -> None:
    files = dict(job.get("files") or {})
    files["main.py"] = job["code"]
    files[".stdin"] = job.get("stdin") or ""
    for name, text in files.items():
        path = os.path.join(workdir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        if uid is not None:
            os.chown(path, uid, uid)


def _wait_status(pid: int) -> int:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def main() -> None:
    job = json.loads(sys.stdin.read())
    sys.stdin.close()
    mode = job["mode"]
    if mode == "namespaces":
        libc = _libc()
        if libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS) != 0:
            _fail(f"unshare: {os.strerror(ctypes.get_errno())}")
        # Forward termination to the namespace's init; SIGKILL of this process is handled by the
        # caller killing the whole process group (the child stays in it).
        pid = os.fork()
        if pid == 0:
            # PID 1 of the new namespace: prepare the filesystem, start the program, wait for it.
            try:
                uid = int(job["uid"])
                _setup_filesystem(libc, int(job.get("tmpfs_mb", 64)))
                workdir = "/tmp/work"
                os.mkdir(workdir, 0o700)
                os.chown(workdir, uid, uid)
                _write_files(job, workdir, uid)
            except BaseException as e:  # noqa: BLE001 - anything here is a launcher failure
                _fail(f"setup failed: {type(e).__name__}: {e}")
            prog = os.fork()
            if prog == 0:
                try:
                    _set_limits(job)
                    os.setgroups([])
                    os.setgid(uid)
                    os.setuid(uid)
                    _exec_program(job, workdir, block_net=False)
                except BaseException as e:  # noqa: BLE001
                    _fail(f"exec failed: {type(e).__name__}: {e}")
            os._exit(_wait_status(prog))
        # Termination requests to the launcher kill the namespace's init (and with it everything).
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, lambda sig, _f, p=pid: os.kill(p, signal.SIGKILL))
        os._exit(_wait_status(pid))
    elif mode == "rlimits":
        workdir = job["workdir"]
        uid = job.get("uid")  # set when we are root: drop to it so RLIMIT_NPROC is enforced
        try:
            if uid is not None:
                os.chown(workdir, uid, uid)
            _write_files(job, workdir, uid)
        except OSError as e:
            _fail(f"cannot write files: {e}")
        pid = os.fork()
        if pid == 0:
            try:
                _set_limits(job)
                if uid is not None:
                    os.setgroups([])
                    os.setgid(uid)
                    os.setuid(uid)
                _exec_program(job, workdir, block_net=True)
            except BaseException as e:  # noqa: BLE001
                _fail(f"setup failed: {type(e).__name__}: {e}")
        os._exit(_wait_status(pid))
    else:
        _fail(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
