import os
import subprocess
import sys

from cli_runs import HANG_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_patch_by_hand_example_matches_hook_reference():
    # The example exits non-zero when the fused forward and the hook reference disagree.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "patch_by_hand.py")],
                          capture_output=True, text=True, env=env, timeout=HANG_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fused vs hook reference" in done.stdout
