"""Running `python -m sgm_ext` in a fresh process as a user does, for the tests of the command
line: its output, a refusal's one line, Ctrl-C at a known point, and the files it leaves. Every
run is waited for however long the machine takes (cli_runs.HANG_S only ends a hang)."""
import hashlib
import os
import signal
import subprocess
import sys
import threading

from cli_runs import HANG_S, ROOT, run_cli

__all__ = ["BEFORE_LOAD", "ROOT", "cli", "interrupted_at", "refused", "snapshot"]


def cli(*args, env=None, cwd=ROOT):
    """`python -m sgm_ext ARGS` in a fresh process, waited for however long it takes: (exit
    status, stdout, stderr). env: more environment variables."""
    return run_cli(*map(str, args), cwd=cwd,
                   env={"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",  # as a user has it
                        **(env or {})})


# A command given this environment stops at its model load (core/pause.py): a refusal that
# comes "before the model loads" ends the process before that; a command that gets there is
# killed at once (cli_runs.run_process) and fails the test.
BEFORE_LOAD = {"SGM_EXT_TEST_PAUSE": "load"}


def _ctrl_c_as_in_a_terminal():
    # a test run started in the background (`pytest ... &` in a script, nohup) passes SIGINT
    # on ignored, and Python then never raises KeyboardInterrupt: the program under test gets
    # SIGINT as a user's terminal delivers it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted_at(pause, args, command=("-m", "sgm_ext")):
    """Run the CLI with SGM_EXT_TEST_PAUSE=pause; when it reports that it paused there, send
    Ctrl-C (SIGINT): (exit status, stdout, stderr). Waits on the program's line, never on
    time."""
    env = dict(os.environ, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0",
               SGM_EXT_TEST_PAUSE=pause)
    proc = subprocess.Popen([sys.executable, *command, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            preexec_fn=_ctrl_c_as_in_a_terminal)
    watchdog = threading.Timer(HANG_S, proc.kill)  # a hang fails the test, it does not block
    watchdog.start()
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if f"sgm-ext: paused at {pause} " in line:
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    assert any("paused at" in line for line in seen), "".join(seen)[-3000:] + err[-3000:]
    return proc.returncode, out, "".join(seen) + err


def snapshot(*paths):
    """{file: sha256} of every file under the paths (a missing path is recorded as missing)."""
    out = {}
    for path in map(str, paths):
        if not os.path.exists(path):
            out[path] = "missing"
        elif os.path.isfile(path):
            with open(path, "rb") as f:
                out[path] = hashlib.sha256(f.read()).hexdigest()
        else:
            for d, _, files in os.walk(path):
                for name in files:
                    out.update(snapshot(os.path.join(d, name)))
    return out


def refused(args, message, *unchanged, status=2, env=None):
    """Run the CLI; assert it failed with `message` on one stderr line, left no traceback and
    changed none of `unchanged`. Returns stderr."""
    before = snapshot(*unchanged)
    rc, out, err = cli(*args, env=env)
    assert rc == status, (rc, out[-2000:], err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0], err[-3000:]
    assert snapshot(*unchanged) == before
    return err
