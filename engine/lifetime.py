"""Child processes that die with their parent, even when the parent is SIGKILLed.

On Linux the kernel sends a process its parent-death signal (``prctl(PR_SET_PDEATHSIG)``) when
the *thread* that started it exits: a child started from a short-lived thread would die with
that thread. Children bound here are therefore started from the main thread only. Elsewhere
(macOS) nothing binds them, and the parent must stop them itself.

`engine.worker` binds itself to its supervisor with `die_with_parent`; tests and benchmarks
start their engine processes with `dying_with_this_process` so that none outlives its run.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Callable

__all__ = ["die_with_parent", "dying_with_this_process"]

#: From <linux/prctl.h>: set the signal this process gets when its parent dies.
PR_SET_PDEATHSIG = 1

# Loaded before any fork: a child between fork and exec should call, not load, a library.
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(parent_pid: int) -> bool:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere a no-op).

    The parent may have died before the request took effect, leaving this process adopted by
    another; the parent pid check after it closes that race.

    Parameters:
      parent_pid(int): the pid of the parent this process should die with.

    Returns:
      bool: False if that parent is gone already, and this process should exit.

    Raises:
      OSError: if the kernel refuses the request.
    """
    if _libc is not None and _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return os.getppid() == parent_pid


def dying_with_this_process() -> Callable[[], None]:
    """A ``preexec_fn`` for `subprocess.Popen` that binds the child to this process's life.

    The child is SIGKILLed when this process dies, however it dies. It is bound before it
    executes its program, so not even its start can outlive this process. Its own children
    are not bound by it: an engine supervisor binds its workers itself.

    Returns:
      Callable[[], None]: the function to pass as ``preexec_fn``.

    Raises:
      RuntimeError: when called outside the main thread, whose end (not the process's) would
        kill the child.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("a child bound to this process must be started from its main thread")
    parent_pid = os.getpid()

    def bind() -> None:
        if not die_with_parent(parent_pid):
            os.kill(os.getpid(), signal.SIGKILL)

    return bind
