"""The programs as a person runs them: in a terminal (a pseudo-terminal of 110 columns), where the progress
bars draw, not only with their output piped to a file."""
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import termios

import pytest

from conftest import REPO


def run_in_terminal(args, cols=110, rows=40, timeout=600):
    """Run `args` from the repository root with stdin, stdout and stderr on a pseudo-terminal of cols x rows;
    returns (exit code, everything it printed)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": str(cols), "TERM": "xterm-256color"}
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=env, start_new_session=True)
    os.close(slave)
    output = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"{args} printed nothing for {timeout} s:\n{output.decode(errors='replace')[-3000:]}")
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the program closed its side of the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(master)
        proc.wait()
    return proc.returncode, output.decode(errors="replace")


def test_training_to_its_budget_in_a_terminal_checkpoints_and_exits_0(shapes_data, tmp_path):
    # The last interval ends past the budget; the training-clock bar must not break there (it did at 3df9fcb:
    # tqdm formats a finished bar's total as None, and "{total:.0f}" raised a TypeError after the last step).
    run = tmp_path / "run"
    # One clock read after 50 steps of batch 32 (seconds on a CPU): the run ends well past its 1 s budget, as
    # the crash needed (tqdm drops the total once the count passes it by half a unit).
    code, output = run_in_terminal([sys.executable, "train_dit.py", "--config", "shapes-cpu", "--data", str(shapes_data),
                                    "--out", str(run), "--budget-seconds", "1", "--batch-size", "32",
                                    "--log-every", "50", "--ckpt-every-seconds", "100"])
    assert code == 0, output[-3000:]
    assert "Traceback" not in output
    assert "training clock" in output and "1/1 s" in output  # the bar drew, and ended full
    assert "done:" in output
    checkpoints = sorted((run / "checkpoints").glob("*.pt"))
    assert checkpoints, output[-3000:]


def test_the_whole_loop_in_a_terminal_draws_its_bars_and_ends_with_a_curve(shapes_data, tmp_path):
    run = tmp_path / "loop"
    code, output = run_in_terminal(["bash", "run.sh", "--data", str(shapes_data), "--budget", "3", "--per-tag", "1",
                                    "--out", str(run)])
    assert code == 0, output[-3000:]
    assert "Traceback" not in output
    for bar in ("training clock", "sampling ckpt_", "scoring ckpt_"):
        assert bar in output, f"no {bar!r} bar in:\n{output[-3000:]}"
    points = json.loads((run / "curve.json").read_text())
    assert points and all(0 <= p["overall"] <= 1 for p in points)
    assert (run / "curve.png").exists() and f"curve:   {run}/curve.png" in output
