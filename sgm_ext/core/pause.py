"""Ctrl-C at start-up, Ctrl-C held off around a change that must not stop half-way, and a
test-only pause.

`interrupted_at_start()` is called where the command's imports catch KeyboardInterrupt (the
package's and the command line's `__init__`, `python -m sgm_ext`): started as the `sgm-ext`
command, the imports run before main()'s error handling, so it says so on one line and exits
with 130; imported as a library, the interrupt goes on as it came.

`interrupts_held()`: a block during which Ctrl-C waits; the KeyboardInterrupt comes when
the block ends (a model's weights folded or restored whole, never half).

`pause_point(name)`: with SGM_EXT_TEST_PAUSE=name in the environment the program says on
stderr that it paused there, then waits for a signal; a test interrupts it at that known point
instead of after a guessed time. With SGM_EXT_TEST_RESUME=FILE as well, it goes on once FILE
exists: a test changes something at that point (a file the program checked) and lets it run
on. Unset (always, outside the tests), it does nothing.
"""
import contextlib
import os
import signal
import sys
import threading
import time

PAUSE_ENV = "SGM_EXT_TEST_PAUSE"
RESUME_ENV = "SGM_EXT_TEST_RESUME"


def pause_point(name):
    """Wait here for a signal when SGM_EXT_TEST_PAUSE is `name` (tests only); with
    SGM_EXT_TEST_RESUME=FILE, until FILE exists."""
    if os.environ.get(PAUSE_ENV) != name:
        return
    print(f"sgm-ext: paused at {name} ({PAUSE_ENV})", file=sys.stderr, flush=True)
    resume = os.environ.get(RESUME_ENV)
    while not (resume and os.path.exists(resume)):
        time.sleep(0.1 if resume else 60)
    print(f"sgm-ext: resumed at {name} ({RESUME_ENV})", file=sys.stderr, flush=True)


@contextlib.contextmanager
def interrupts_held():
    """Hold Ctrl-C (SIGINT) off while the block runs; one that came meanwhile is delivered to
    the handler there was (Python's: KeyboardInterrupt) when the block ends. Outside the main
    thread, where signals are not handled, a plain block."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield  # None: a handler set outside Python, which could not be put back
        return
    came = []
    signal.signal(signal.SIGINT, lambda signum, frame: came.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if came and callable(previous):
            previous(signal.SIGINT, came[0])
        elif came and previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


def started_as_command():
    """Whether this process is the `sgm-ext` command (its script, or `python -m sgm_ext`)."""
    argv0 = sys.argv[0] if sys.argv else ""
    name = os.path.basename(argv0)
    return argv0 == "-m" or name in ("sgm-ext", "sgm-ext.exe") or \
        argv0.endswith(os.path.join("sgm_ext", "__main__.py"))


def interrupted_at_start():
    """In an `except KeyboardInterrupt:` around imports: as the command, one line and exit
    status 130; as a library, re-raise."""
    if not started_as_command():
        raise  # noqa: PLE0704  (the KeyboardInterrupt being handled)
    print("sgm-ext: error: interrupted (Ctrl-C) while starting, before the command ran",
          file=sys.stderr, flush=True)
    os._exit(130)
