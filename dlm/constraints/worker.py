"""Token automata built in a child process, under a time and memory budget.

outlines-core builds a regex's token DFA in native code that holds the GIL and can run for
minutes (`.{0,32767}` unrolls into tens of thousands of states) while memory grows. Built in a
child process, a build that passes its time budget is stopped by killing the child, and nothing
in the serving process (event loop, decoding thread) waits on it. The child imports only numpy
and outlines-core (no torch), so it starts in a fraction of a second; it is started once and
reused. It is a plain `python -m dlm.constraints.worker` talking pickled frames over its stdin /
stdout (not multiprocessing: that would re-run the caller's main script in the child).

    pool = AutomatonPool(eos_id, token_bytes_table, workers=2)
    pool.build(regex, timeout_s=2.0, max_states=4096)   # -> Automaton, or raises BuildFailed
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass
class Automaton:
    """outlines-core's token DFA as parallel transition arrays (src --tok--> dst)."""

    src: np.ndarray
    tok: np.ndarray
    dst: np.ndarray
    initial: int
    finals: list[int]
    num_states: int
    build_s: float


class BuildFailed(Exception):
    """reason: "timeout" | "too_large" | "memory" | "error"; detail: a message."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def _send(f, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


def _read_exact(f, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = f.read(n - len(buf))
        if not part:
            raise EOFError("the pipe closed")
        buf += part
    return buf


def _recv(f):
    (n,) = struct.unpack("<Q", _read_exact(f, 8))
    return pickle.loads(_read_exact(f, n))


def _child() -> None:
    """The child's loop: (regex, max_states) in, ("ok", arrays...) / ("too_large", n) / ("error", msg) out."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the frames
    eos_id, groups, memory_bytes = _recv(inp)
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    except (ImportError, ValueError, OSError):  # not on this platform: the time budget still holds
        pass
    from outlines_core import Index, Vocabulary

    vocab = Vocabulary(eos_id, groups)
    _send(out, ("ready",))
    while True:
        try:
            regex, max_states = _recv(inp)
        except EOFError:
            return
        t0 = time.perf_counter()
        try:
            index = Index(regex, vocab)
            trans = index.get_transitions()
            if len(trans) + 2 > max_states:
                _send(out, ("too_large", len(trans) + 2))
                continue
            n = sum(len(m) for m in trans.values())
            src = np.empty(n, dtype=np.int64)
            tok = np.empty(n, dtype=np.int64)
            dst = np.empty(n, dtype=np.int64)
            i = 0
            for s, m in trans.items():
                k = len(m)
                src[i : i + k] = s
                tok[i : i + k] = np.fromiter(m.keys(), dtype=np.int64, count=k)
                dst[i : i + k] = np.fromiter(m.values(), dtype=np.int64, count=k)
                i += k
            _send(out, ("ok", src, tok, dst, index.get_initial_state(), list(index.get_final_states()),
                        len(trans) + 2, time.perf_counter() - t0))
        except MemoryError:
            _send(out, ("memory", ""))
        except Exception as e:  # outlines-core: ValueError for a bad pattern or an empty language
            _send(out, ("error", f"{type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, eos_id: int, groups: dict, memory_bytes: int):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "dlm.constraints.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        _send(self.proc.stdin, (eos_id, groups, memory_bytes))
        self.ready = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float) -> bool:
        if not self.ready and self.poll(timeout):
            self.ready = _recv(self.proc.stdout) == ("ready",)
        return self.ready

    def poll(self, timeout: float) -> bool:
        return bool(select.select([self.proc.stdout], [], [], max(0.0, timeout))[0])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=5)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


STARTUP_S = 30.0


class AutomatonPool:
    """A few child processes building automata for one tokenizer; a build that runs past its
    budget (or dies) costs its child, which is replaced on the next build."""

    def __init__(self, eos_id: int, table: Sequence[Optional[bytes]], workers: int = 2,
                 memory_bytes: int = 8 << 30):
        groups: dict[bytes, list[int]] = {}
        for i, b in enumerate(table):
            if b is not None and i != eos_id:
                groups.setdefault(b, []).append(i)
        self.eos_id, self.groups, self.memory_bytes = eos_id, groups, memory_bytes
        self.free: list[Optional[_Worker]] = [None] * workers
        self.cond = threading.Condition()

    def _take(self) -> Optional[_Worker]:
        with self.cond:
            while not self.free:
                self.cond.wait()
            return self.free.pop()

    def _give(self, w: Optional[_Worker]) -> None:
        with self.cond:
            self.free.append(w)
            self.cond.notify()

    def warm(self) -> None:
        """Start the children now (a server does this at start-up, off the request path)."""
        taken = []
        with self.cond:
            taken, self.free = self.free, []
        started = [w if w is not None and w.alive() else _Worker(self.eos_id, self.groups, self.memory_bytes)
                   for w in taken]
        for w in started:
            self._give(w)

    def build(self, regex: str, timeout_s: float, max_states: int) -> Automaton:
        w = self._take()
        try:
            if w is None or not w.alive():
                w = _Worker(self.eos_id, self.groups, self.memory_bytes)
            if not w.wait_ready(STARTUP_S):  # a cold start does not count against the build's budget
                raise OSError("the automaton builder did not start")
            _send(w.proc.stdin, (regex, max_states))
            if not w.poll(timeout_s):
                w.kill()
                w = None
                raise BuildFailed("timeout", f"longer than {timeout_s:g} s")
            msg = _recv(w.proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError, struct.error):
            # the child died (a native allocation failure aborts it) or could not start
            if w is not None:
                w.kill()
            w = None
            raise BuildFailed("memory", "the automaton builder stopped (out of its memory budget?)") from None
        finally:
            self._give(w)
        kind = msg[0]
        if kind == "ok":
            _, src, tok, dst, initial, finals, n, secs = msg
            return Automaton(src, tok, dst, initial, finals, n, secs)
        if kind == "too_large":
            raise BuildFailed("too_large", f"{msg[1]} states")
        raise BuildFailed(kind, msg[1])

    def close(self) -> None:
        with self.cond:
            for w in self.free:
                if w is not None:
                    w.kill()
            self.free = [None] * len(self.free)


if __name__ == "__main__":
    _child()
