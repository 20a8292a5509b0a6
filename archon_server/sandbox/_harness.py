"""In-sandbox grading harness (stdlib only; runs as the sandbox's ``main.py``).

Why a harness: a program that *is* candidate code followed by its tests can forge its own
verdict (``os._exit(0)`` before the tests, a redefined ``check``, a fake success line, an
object whose ``__eq__`` is always true).  Here the candidate never shares a process with
the tests:

* this process (trusted) reads the job — tests, trusted prelude, a per-run random nonce —
  from stdin, deletes the stdin file, and makes itself non-dumpable (``PR_SET_DUMPABLE=0``:
  a same-uid process can no longer ptrace it or open its ``/proc/<pid>/{mem,fd}``);
* for every test it starts a fresh worker interpreter (``exec``: none of this process's
  memory is inherited) that imports ``candidate.py`` and answers remote calls over two
  pipes; the worker's stdout goes to stderr, so it cannot write to this process's stdout;
* the test code runs *here*: a name bound from the candidate is a proxy whose calls run in
  the worker; results come back as plain data (tagged JSON decoded into genuine builtins, so
  comparisons are Python's own), anything else stays a remote handle that compares by
  identity only.  An exit, a ``SystemExit``/``KeyboardInterrupt``, a crash or a hang of the
  worker aborts the test as failed, whatever the test code catches;
* only after every test has run does this process print one line ``<nonce> <json>`` on
  stdout.  The host believes that line and nothing else: no line (harness killed, output
  cut, timeout) means every test failed.
"""

import base64
import builtins
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time

MAX_MESSAGE = 64 * 1024 * 1024

# ----------------------------------------------------------------------------- wire format
# Both sides speak length-prefixed JSON; values are tagged lists so that tuples, sets, bytes,
# big ints and non-finite floats survive and nothing is ever evaluated on decode.

WORKER = r'''
import base64, json, numbers, os, struct, sys
MAX = %(max)d
req_fd, rep_fd = int(sys.argv[1]), int(sys.argv[2])
handles = {}

def send(obj):
    data = json.dumps(obj).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(rep_fd, data):]

def recv_exact(n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(req_fd, n - len(buf))
        if not chunk:
            os._exit(0)
        buf += chunk
    return buf

def recv():
    (n,) = struct.unpack(">I", recv_exact(4))
    return json.loads(recv_exact(n))

def handle(x):
    handles[id(x)] = x
    return ["h", id(x), type(x).__name__]

def enc(x, depth=0):
    if depth > 100:
        raise ValueError("value nested too deeply")
    if x is None: return ["N"]
    if x is Ellipsis: return ["E"]
    if isinstance(x, bool): return ["b", bool(x)]
    if isinstance(x, numbers.Integral): return ["i", str(int(x))]
    if isinstance(x, numbers.Real): return ["f", repr(float(x))]
    if isinstance(x, numbers.Complex): return ["c", repr(float(x.real)), repr(float(x.imag))]
    if isinstance(x, str): return ["s", str.__str__(x)]
    if isinstance(x, (bytes, bytearray)): return ["y", base64.b64encode(bytes(x)).decode()]
    if type(x) in (list, tuple, set, frozenset):
        tag = {list: "l", tuple: "t", set: "S", frozenset: "F"}[type(x)]
        try:
            return [tag, [enc(v, depth + 1) for v in x]]
        except ValueError:
            return handle(x)
    if type(x) is dict:
        try:
            return ["d", [[enc(k, depth + 1), enc(v, depth + 1)] for k, v in x.items()]]
        except ValueError:
            return handle(x)
    if depth:
        raise ValueError("not plain data")
    return handle(x)

def enc_top(x):
    try:
        return enc(x)
    except ValueError:
        return handle(x)

def dec(v):
    t = v[0]
    if t == "N": return None
    if t == "E": return Ellipsis
    if t == "b": return v[1]
    if t == "i": return int(v[1])
    if t == "f": return float(v[1])
    if t == "c": return complex(float(v[1]), float(v[2]))
    if t == "s": return v[1]
    if t == "y": return base64.b64decode(v[1])
    if t == "l": return [dec(x) for x in v[1]]
    if t == "t": return tuple(dec(x) for x in v[1])
    if t == "S": return {dec(x) for x in v[1]}
    if t == "F": return frozenset(dec(x) for x in v[1])
    if t == "d": return {dec(k): dec(x) for k, x in v[1]}
    if t == "h": return handles[v[1]]
    raise ValueError(f"bad tag {t!r}")

ns = {"__name__": "candidate", "__file__": "candidate.py", "__builtins__": __builtins__}
try:
    with open("candidate.py", encoding="utf-8") as f:
        src = f.read()
    exec(compile(src, "candidate.py", "exec"), ns)
    send({"ok": ["N"], "names": sorted(k for k in ns if not k.startswith("__"))})
except BaseException as e:
    send({"raise": [type(e).__name__, str(e)[:500], isinstance(e, Exception)]})
    os._exit(0)

while True:
    msg = recv()
    op = msg["op"]
    try:
        if op == "global":
            out = ns[msg["name"]]
        else:
            target = handles[msg["h"]]
            if op == "call":
                out = target(*dec(msg["args"]), **dec(msg["kw"]))
            elif op == "attr":
                out = getattr(target, msg["name"])
            elif op == "iter":
                out = iter(target)
            elif op == "next":
                out = next(target)
            elif op == "len":
                out = len(target)
            elif op == "getitem":
                out = target[dec(msg["key"])]
            elif op == "contains":
                out = bool(dec(msg["key"]) in target)
            elif op == "bool":
                out = bool(target)
            elif op == "repr":
                out = repr(target)
            elif op == "str":
                out = str(target)
            else:
                raise ValueError(f"unknown op {op!r}")
        reply = {"ok": enc_top(out)}
    except BaseException as e:
        reply = {"raise": [type(e).__name__, str(e)[:500], isinstance(e, Exception)]}
    send(reply)
'''


class Abort(BaseException):
    """The worker exited, crashed, hung or raised a non-Exception: the test fails, whatever it catches."""


class CandidateError(Exception):
    """An exception raised in the candidate whose type has no builtin counterpart here."""


def _enc(x, depth=0):
    if depth > 100:
        raise ValueError("value nested too deeply")
    if isinstance(x, Remote):
        return ["h", object.__getattribute__(x, "_h"), ""]
    if x is None: return ["N"]
    if x is Ellipsis: return ["E"]
    if isinstance(x, bool): return ["b", x]
    if isinstance(x, int): return ["i", str(x)]
    if isinstance(x, float): return ["f", repr(x)]
    if isinstance(x, complex): return ["c", repr(x.real), repr(x.imag)]
    if isinstance(x, str): return ["s", x]
    if isinstance(x, (bytes, bytearray)): return ["y", base64.b64encode(bytes(x)).decode()]
    for typ, tag in ((list, "l"), (tuple, "t"), (set, "S"), (frozenset, "F")):
        if isinstance(x, typ):
            return [tag, [_enc(v, depth + 1) for v in x]]
    if isinstance(x, dict):
        return ["d", [[_enc(k, depth + 1), _enc(v, depth + 1)] for k, v in x.items()]]
    raise TypeError(f"cannot pass a {type(x).__name__} to the candidate")


def _dec(v, worker, depth=0):
    """Untrusted data -> genuine builtins (or a Remote handle); anything malformed aborts the test."""
    if depth > 200 or not isinstance(v, list) or not v or not isinstance(v[0], str):
        raise Abort("malformed reply from the candidate process")
    t, n = v[0], len(v)
    try:
        if t == "N" and n == 1: return None
        if t == "E" and n == 1: return Ellipsis
        if t == "b" and n == 2 and type(v[1]) is bool: return v[1]
        if t == "i" and n == 2 and type(v[1]) is str: return int(v[1])
        if t == "f" and n == 2 and type(v[1]) is str: return float(v[1])
        if t == "c" and n == 3 and type(v[1]) is str and type(v[2]) is str: return complex(float(v[1]), float(v[2]))
        if t == "s" and n == 2 and type(v[1]) is str: return v[1]
        if t == "y" and n == 2 and type(v[1]) is str: return base64.b64decode(v[1], validate=True)
        if t in ("l", "t", "S", "F") and n == 2 and type(v[1]) is list:
            items = [_dec(x, worker, depth + 1) for x in v[1]]
            return {"l": list, "t": tuple, "S": set, "F": frozenset}[t](items)
        if t == "d" and n == 2 and type(v[1]) is list:
            out = {}
            for pair in v[1]:
                if type(pair) is not list or len(pair) != 2:
                    raise Abort("malformed reply from the candidate process")
                out[_dec(pair[0], worker, depth + 1)] = _dec(pair[1], worker, depth + 1)
            return out
        if t == "h" and n == 3 and type(v[1]) is int and type(v[2]) is str:
            return Remote(worker, v[1], v[2][:100])
    except Abort:
        raise
    except Exception as e:  # noqa: BLE001 - bad numbers, unhashable keys...
        raise Abort(f"malformed reply from the candidate process: {type(e).__name__}") from None
    raise Abort("malformed reply from the candidate process")


class Worker:
    """One candidate process; every request waits at most until the test's deadline."""

    def __init__(self, python, deadline):
        self.deadline = deadline
        self.aborted = None
        req_r, self.req_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [python, "-I", "-B", "-c", WORKER % {"max": MAX_MESSAGE}, str(req_r), str(rep_w)],
                stdin=subprocess.DEVNULL, stdout=2, stderr=2, pass_fds=(req_r, rep_w), close_fds=True,
            )
        finally:
            os.close(req_r)
            os.close(rep_w)
        self.names = []
        reply = self._receive()
        self.names = reply.get("names") if isinstance(reply.get("names"), list) else []
        self._result(reply)

    def _abort(self, why):
        self.aborted = self.aborted or why
        self.close()
        raise Abort(why)

    def _read(self, n):
        buf = b""
        while len(buf) < n:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self._abort("timeout")
            ready, _, _ = select.select([self.rep_r], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.rep_r, min(n - len(buf), 1 << 20))
            if not chunk:
                self.proc.wait()
                self._abort(f"candidate process ended (status {self.proc.returncode})")
            buf += chunk
        return buf

    def _receive(self):
        if self.aborted:
            raise Abort(self.aborted)
        (n,) = struct.unpack(">I", self._read(4))
        if n > MAX_MESSAGE:
            self._abort("reply too large")
        try:
            reply = json.loads(self._read(n))
        except ValueError:
            self._abort("malformed reply from the candidate process")
        if not isinstance(reply, dict):
            self._abort("malformed reply from the candidate process")
        return reply

    def _result(self, reply):
        if "raise" in reply:
            r = reply["raise"]
            if not (isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and isinstance(r[1], str)):
                self._abort("malformed reply from the candidate process")
            name, message, is_exception = r[0][:100], r[1], r[2] is True
            if not is_exception:
                self._abort(f"candidate raised {name}")
            cls = getattr(builtins, name, None)
            if not (isinstance(cls, type) and issubclass(cls, Exception)):
                raise CandidateError(f"{name}: {message}")
            try:
                exc = cls(message)
            except Exception:  # noqa: BLE001 - exception types with other constructors
                exc = CandidateError(f"{name}: {message}")
            raise exc
        if "ok" not in reply:
            self._abort("malformed reply from the candidate process")
        try:
            return _dec(reply["ok"], self)
        except Abort as e:
            self._abort(str(e))

    def request(self, **msg):
        if self.aborted:
            raise Abort(self.aborted)
        data = json.dumps(msg).encode()
        data = struct.pack(">I", len(data)) + data
        try:
            while data:
                data = data[os.write(self.req_w, data):]
        except OSError:
            self._abort("candidate process ended")
        return self._result(self._receive())

    def close(self):
        for fd in (self.req_w, self.rep_r):
            try:
                os.close(fd)
            except OSError:
                pass
        self.req_w = self.rep_r = -1
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Remote:
    """A candidate object living in the worker.  Never equal to anything but itself, never trusted."""

    __slots__ = ("_h", "_t", "_w")

    def __init__(self, worker, h, typename):
        object.__setattr__(self, "_w", worker)
        object.__setattr__(self, "_h", h)
        object.__setattr__(self, "_t", typename)

    def _req(self, op, **kw):
        return object.__getattribute__(self, "_w").request(op=op, h=object.__getattribute__(self, "_h"), **kw)

    def __call__(self, *args, **kw):
        return self._req("call", args=_enc(list(args)), kw=_enc(dict(kw)))

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._req("attr", name=name)

    def __iter__(self):
        it = self._req("iter")
        if not isinstance(it, Remote):
            it = builtins.iter(it)
        return it

    def __next__(self):
        try:
            return self._req("next")
        except StopIteration:
            raise StopIteration from None

    def __len__(self):
        n = self._req("len")
        if type(n) is not int:
            raise TypeError("len() of the candidate's object is not an int")
        return n

    def __getitem__(self, key):
        return self._req("getitem", key=_enc(key))

    def __contains__(self, key):
        return self._req("contains", key=_enc(key)) is True

    def __bool__(self):
        return self._req("bool") is True

    def __repr__(self):
        r = self._req("repr")
        return r if type(r) is str else "<candidate object>"

    def __str__(self):
        r = self._req("str")
        return r if type(r) is str else "<candidate object>"

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    __hash__ = object.__hash__


def _non_dumpable():
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(4, 0, 0, 0, 0) == 0  # PR_SET_DUMPABLE, 0
    except Exception:  # noqa: BLE001
        return False


def _run_test(job, test, python):
    """Run one test against a fresh worker; returns (passed, error)."""
    ns = {"__name__": "__test__", "__builtins__": builtins}
    budget = float(job.get("per_test_timeout_s", 5.0))
    deadline = time.monotonic() + budget
    worker = None

    def _timeout(_sig, _frame):
        raise Abort("timeout")

    signal.signal(signal.SIGALRM, _timeout)  # the test code itself may loop forever
    signal.setitimer(signal.ITIMER_REAL, budget + 0.5)
    try:
        if job.get("prelude"):
            exec(compile(job["prelude"], "prelude.py", "exec"), ns)  # noqa: S102 - trusted prelude, sandboxed
        worker = Worker(python, deadline)
        bind = job.get("bind", "*")
        names = [n for n in worker.names if isinstance(n, str)] if bind == "*" else list(bind)
        for name in names:
            ns[name] = worker.request(op="global", name=name)
        exec(compile(test, "test.py", "exec"), ns)  # noqa: S102 - trusted tests, sandboxed
        if worker.aborted:
            return False, worker.aborted
        return True, ""
    except BaseException as e:  # noqa: BLE001 - SystemExit in a test is a failure too
        if worker is not None and worker.aborted:
            return False, worker.aborted
        return False, f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if worker is not None:
            worker.close()


def main():
    job = json.loads(sys.stdin.read())
    try:
        os.unlink(".stdin")
    except OSError:
        pass
    nonce = job.pop("nonce")
    results = []
    if not _non_dumpable():
        results = [[False, "harness cannot protect itself (prctl failed)"] for _ in job["tests"]]
    else:
        for test in job["tests"]:
            results.append(list(_run_test(job, test, sys.executable)))
    line = "\n" + nonce + " " + json.dumps(results) + "\n"
    sys.stdout.flush()
    os.write(1, line.encode())
    os._exit(0)


if __name__ == "__main__":
    main()
