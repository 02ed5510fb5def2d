"""Starting vLLM's OpenAI server for `sgm-ext serve`: the checks that need no model (the
address it will listen on) and the run itself, as a child process whose failure is explained
when the scale file changed on disk while it was starting. Nothing here imports vLLM.

The serve command's flow (sgm_ext.cli): check_listen_address(vllm_args) first, then the
scale file's hash (modules.file_sha256) pinned into the settings (scales_sha256) before the
file is checked against the model, then run_server(command, scales, sha256) in place of
os.execv.
"""
import errno
import os
import signal
import socket
import subprocess
import sys
from typing import Optional, Sequence

from .settings import file_state

DEFAULT_PORT = 8000  # vLLM's OpenAI server's


def _option(args: Sequence[str], name: str) -> Optional[str]:
    """The value of `--name X` / `--name=X` in a command line (the last one wins, as in
    argparse), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1:]
    return value


def listen_address(vllm_args: Sequence[str]):
    """(host, port) the vLLM server will listen on, from its options (--host, --port; host
    "" is every interface, as vLLM binds it), or None when it listens on a Unix socket
    (--uds). ValueError naming --port when it is not a port number."""
    if _option(vllm_args, "--uds") is not None:
        return None
    port = _option(vllm_args, "--port")
    if port is None:
        return _option(vllm_args, "--host") or "", DEFAULT_PORT
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise ValueError(f"--port is {port!r}; it must be a port number in [0, 65535]")
    return _option(vllm_args, "--host") or "", number


def check_port_free(host: str, port: int) -> None:
    """ValueError, one line, when the server could not listen on (host, port): the port is in
    use (another server) or the host is not an address of this machine. Binds as vLLM does
    (SO_REUSEADDR: a port left in TIME_WAIT is free) and lets go at once. Port 0 (any free
    port) always passes."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = f"{host}:{port}" if host else f"port {port} (every interface; --host not given)"
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"{where} is already in use (another server?): stop it, or "
                             "choose another port with --port") from None
        if e.errno == errno.EACCES:
            raise ValueError(f"{where}: no permission to listen there (ports below 1024 "
                             "need privileges): choose another with --port") from None
        raise ValueError(f"cannot listen on {where}: {e.strerror or e} (--host, --port)") \
            from None


def check_listen_address(vllm_args: Sequence[str]) -> None:
    """The serve command's check before anything starts: the address in vLLM's options
    (--host, --port, default every interface, port 8000) is free. ValueError, one line."""
    address = listen_address(vllm_args)
    if address is not None:
        check_port_free(*address)


FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def _adopt_orphans() -> bool:
    """Make this process the subreaper of its descendants (Linux prctl): a process of the
    server's left running when the server exits (vLLM's engine core, its workers, still
    printing their tracebacks) becomes our child, so that we can wait for it. False where
    the call is not there (another OS)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _wait_for_orphans() -> None:
    """Wait until every descendant the subreaper adopted has exited: after that nothing of
    the server's can print any more."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:  # none left
            return
        except InterruptedError:  # pragma: no cover (PEP 475 retries)
            continue


def run_server(command: Sequence[str], scales: str, scales_sha256: str) -> int:
    """Run vLLM's server (`command`, from the serve command) as a child in its own process
    group and wait for it; the signals this process gets (Ctrl-C, SIGTERM, SIGHUP, SIGQUIT)
    go to the child once, so that vLLM shuts down as it would alone. Returns the child's
    exit status (128 + N when a signal N ended it).

    When the server failed and the scale file is no longer the one checked (scales_sha256:
    the hash pinned into the settings before the check), ValueError with the one true cause:
    the caller prints it as its last line (exit status 2), below vLLM's tracebacks: the
    server's processes that outlive it (vLLM's engine core exits after its front end) are
    waited for first, so nothing of theirs comes after that line."""
    adopting = _adopt_orphans()
    child = subprocess.Popen(list(command), start_new_session=True)  # signals: ours only
    received = []

    def forward(signum, frame):
        received.append(signum)
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        while True:
            try:
                status = child.wait()
                break
            except InterruptedError:  # pragma: no cover (PEP 475 retries)
                continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if status != 0 and not received:
        state = file_state(scales, scales_sha256)
        if state != "as loaded":
            if adopting:
                _wait_for_orphans()
            what = "was deleted" if state == "missing" else "changed on disk"
            raise ValueError(f"{scales} {what} while the server was starting, after sgm-ext "
                             "serve checked it: nothing was served; start the server again "
                             f"(vLLM stopped with exit status {_status(status)})")
    return _status(status)


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def main(argv=None):  # pragma: no cover (a test's way in: python -m sgm_ext.serving.launch)
    """`python -m sgm_ext.serving.launch SCALES SHA256 -- COMMAND...`: run_server with the
    serve command's error handling (one `error:` line, exit status 2)."""
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--")
    scales, digest = argv[:split]
    try:
        return run_server(argv[split + 1:], scales, digest)
    except ValueError as e:
        print(f"sgm-ext serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
