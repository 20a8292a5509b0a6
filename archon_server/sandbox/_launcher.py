"""Sandbox launcher: runs as a separate process (stdlib only, started with ``python -I -S``).

It reads a JSON job on stdin, isolates itself, then runs the untrusted program and exits
with the program's status (128 + signal number when the program died of a signal; 125
when the launcher itself failed, with a ``SANDBOX-LAUNCHER:`` line on stderr).

Isolation in "namespaces" mode (as root, or not root inside a fresh unprivileged user namespace):
  * unshare network, mount, PID, IPC and UTS namespaces (and user, when not root: only our
    own uid and gid are mapped, so the program is a plain user without capabilities).  The
    new network namespace has only a loopback device that is down: nothing can be reached,
    not even 127.0.0.1 of the host.
  * The new root is a small tmpfs (mounted on an empty directory the caller made) holding
    read-only bind mounts of ``job["view"]`` (what the program's Python needs), a fresh
    size-limited /tmp (the working directory /tmp/work lives there and disappears with the
    namespace), a minimal /dev and a fresh /proc of the new PID namespace; the tmpfs is then
    made read-only and becomes / (pivot_root, the host's root detached).  Nothing else of
    the host is visible.
  * A small init (this launcher, forked) is PID 1 of the new PID namespace and the
    program is its child; when the program exits or the caller kills the process group,
    init exits and the kernel kills every process left in the namespace (no orphans, no
    surviving fork-bomb children).
  * As root, privileges are dropped to a fresh, unused uid/gid with no supplementary groups,
    so RLIMIT_NPROC is enforced (the kernel exempts root from it); no_new_privs is set.
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
MS_MOVE = 8192
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_RELATIME = 1 << 21
MNT_DETACH = 2
CLONE_NEWUSER = 0x10000000
PR_SET_NO_NEW_PRIVS = 38

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
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _mount(libc: ctypes.CDLL, src: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    enc = lambda s: s.encode() if s is not None else None
    if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _umount(libc: ctypes.CDLL, target: str, flags: int) -> None:
    if libc.umount2(target.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


# statvfs flags -> the mount flags a bind remount must repeat (in a user namespace the kernel refuses to clear them)
_KEEP_FLAGS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
               (getattr(os, "ST_NOATIME", 1024), MS_NOATIME), (getattr(os, "ST_NODIRATIME", 2048), MS_NODIRATIME),
               (getattr(os, "ST_RELATIME", 4096), MS_RELATIME))


def _locked_flags(path: str) -> int:
    have = os.statvfs(path).f_flag
    return sum(ms for st, ms in _KEEP_FLAGS if have & st)


def _makedirs(path: str) -> None:
    """Create the directories on the way to a mount point, traverse-only (0111, for their owner too, who is the
    program itself in a user namespace; the tmpfs is read-only by the time it runs, so no chmod undoes that): the
    program can reach what is bound below them but cannot list them."""
    if os.path.isdir(path):
        return
    _makedirs(os.path.dirname(path))
    os.mkdir(path, 0o111)
    os.chmod(path, 0o111)  # whatever the umask


def _place(libc: ctypes.CDLL, root: str, path: str) -> None:
    """Make ``path`` exist in the new root as on the host: each symlink on the way is recreated (a symlink, not
    its target's contents), the real file or directory at the end is bind-mounted read-only."""
    for _ in range(40):  # at most that many symlinks on the way, as the kernel allows
        parts = path.strip("/").split("/")
        cur = ""
        for i, part in enumerate(parts):
            cur += "/" + part
            if os.path.islink(cur):
                target = os.readlink(cur)
                inside = root + cur
                if not os.path.lexists(inside):
                    _makedirs(os.path.dirname(inside))
                    os.symlink(target, inside)
                rest = "/".join(parts[i + 1:])
                path = os.path.normpath(os.path.join(os.path.dirname(cur), target, rest))
                break
        else:
            _bind(libc, root, path)
            return
    raise OSError(f"too many symlinks on the way to {path}")


def _bind(libc: ctypes.CDLL, root: str, src: str, device: bool = False) -> None:
    """Bind-mount ``src`` at the same path under ``root``: read-only, no setuid, no device nodes (but the few /dev
    nodes themselves, which are bound writable: writing to /dev/null is how programs throw output away)."""
    dst = root + src
    if os.path.isdir(src):
        _makedirs(dst)
    elif not os.path.exists(dst):
        _makedirs(os.path.dirname(dst))
        os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644))
    _mount(libc, src, dst, None, MS_BIND | MS_REC, None)
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | _locked_flags(src) | (0 if device else MS_RDONLY | MS_NODEV)
    _mount(libc, None, dst, None, flags, None)


def _pivot(libc: ctypes.CDLL, root: str) -> None:
    """Make ``root`` the root of this mount namespace and drop the host's from it entirely (pivot_root(".", ".")
    then detach the old root, as runc does); where pivot_root is refused, move the mount over / and chroot."""
    os.chdir(root)
    nr = {"x86_64": 155, "aarch64": 41, "arm64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}.get(os.uname().machine)
    if nr is not None and libc.syscall(nr, b".", b".") == 0:
        _umount(libc, ".", MNT_DETACH)
    else:
        _mount(libc, root, "/", None, MS_MOVE, None)
        os.chroot(".")
    os.chdir("/")


def _setup_filesystem(libc: ctypes.CDLL, job: dict) -> None:
    """A new root: a small read-only tmpfs holding only the bind mounts of what the program's Python needs
    (``job["view"]``: interpreter, standard library, site-packages, shared libraries; read-only), a fresh /tmp
    (the throwaway working directory lives there), a minimal /dev and a /proc of the new PID namespace."""
    tmpfs_mb = int(job.get("tmpfs_mb", 64))
    root = job["root"]
    # Our mount changes must not propagate back to the host namespace.
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE, None)
    _mount(libc, "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in job["view"]:
        if os.path.lexists(path):
            _place(libc, root, path)
    os.mkdir(root + "/tmp", 0o1777)
    _mount(libc, "tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmpfs_mb}m,mode=1777")
    _makedirs(root + "/dev")
    os.chmod(root + "/dev", 0o755)
    for dev in ("null", "zero", "full", "random", "urandom"):
        if os.path.exists("/dev/" + dev):
            _bind(libc, root, "/dev/" + dev, device=True)
    os.mkdir(root + "/dev/shm", 0o1777)
    _mount(libc, "tmpfs", root + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmpfs_mb}m,mode=1777")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    os.mkdir(root + "/proc", 0o555)
    try:
        _mount(libc, "proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    except OSError:
        pass  # some container runtimes refuse a fresh proc; Python runs without one
    _mount(libc, None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    _pivot(libc, root)


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
        flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
        userns = os.geteuid() != 0  # not root: an unprivileged user namespace gives us the right to mount
        if libc.unshare(flags | (CLONE_NEWUSER if userns else 0)) != 0:
            _fail(f"unshare: {os.strerror(ctypes.get_errno())}")
        if userns:
            # Map only ourselves (same ids inside): the program then runs as a plain user without capabilities.
            try:
                uid, gid = os.geteuid(), os.getegid()
                for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
            except OSError as e:
                _fail(f"user namespace id maps: {e}")
        # Forward termination to the namespace's init; SIGKILL of this process is handled by the
        # caller killing the whole process group (the child stays in it).
        pid = os.fork()
        if pid == 0:
            # PID 1 of the new namespace: prepare the filesystem, start the program, wait for it.
            try:
                uid = job.get("uid")  # a fresh uid to drop to (root); None in a user namespace (we are a user already)
                _setup_filesystem(libc, job)
                workdir = "/tmp/work"
                os.mkdir(workdir, 0o700)
                if uid is not None:
                    os.chown(workdir, uid, uid)
                _write_files(job, workdir, uid)
            except BaseException as e:  # noqa: BLE001 - anything here is a launcher failure
                _fail(f"setup failed: {type(e).__name__}: {e}")
            prog = os.fork()
            if prog == 0:
                try:
                    _set_limits(job)
                    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
                    if uid is not None:
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
