"""Helpers shared by the scale benchmarks: each step runs in a fresh child process that prints one JSON line."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_child(script: str, flags: list[str], *args: str) -> dict:
    """`python script --child args... flags...`; its last stdout line as JSON, or SystemExit with its stderr."""
    cmd = [sys.executable, script, '--child', *args, *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    if proc.returncode != 0:
        raise SystemExit(f'child {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])
