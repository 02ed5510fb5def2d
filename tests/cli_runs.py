"""Programs run in a fresh process by the tests (the command line as a user runs it, scripts,
examples), waited for however long the machine takes: a loaded machine runs them many times
slower, and a test must not fail for that. HANG_S, the only time limit, is there to end a hang,
never to judge a speed.

run_cli stops a command that reached a test pause point (core/pause.py, SGM_EXT_TEST_PAUSE
without SGM_EXT_TEST_RESUME): a refusal that must come before the model loads is checked by
pausing at the load; a command that gets there is stopped and reported at once, instead of
waiting there until a guessed time runs out."""
import os
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_S = 3600  # a subprocess still running after an hour hangs: no real work here takes that
PAUSED = "sgm-ext: paused at "  # core/pause.py's line


def run_process(command, env=None, cwd=ROOT):
    """Run `command` (a list) and wait for it: (exit status, stdout, stderr). env: the whole
    environment (None: this one's). When env sets SGM_EXT_TEST_PAUSE (and no
    SGM_EXT_TEST_RESUME) and the program says it paused there, it is killed (exit status
    -9) with a line saying so at the end of stderr."""
    env = dict(os.environ if env is None else env)
    stop_at_pause = bool(env.get("SGM_EXT_TEST_PAUSE")) and not env.get("SGM_EXT_TEST_RESUME")
    proc = subprocess.Popen([str(c) for c in command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    out = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    watchdog = threading.Timer(HANG_S, proc.kill)
    watchdog.start()
    err = []
    try:
        for line in proc.stderr:
            err.append(line)
            if stop_at_pause and line.startswith(PAUSED):
                proc.kill()
                err.append(f"(the test killed it: it reached the pause point "
                           f"{env['SGM_EXT_TEST_PAUSE']!r})\n")
        proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join()
    return proc.returncode, "".join(out), "".join(err)


def run_cli(*args, env=None, cwd=ROOT):
    """`python -m sgm_ext ARGS` in a fresh process, waited for: (exit status, stdout,
    stderr). env: more environment variables."""
    return run_process([sys.executable, "-m", "sgm_ext", *args],
                       env=dict(os.environ, **(env or {})), cwd=cwd)
