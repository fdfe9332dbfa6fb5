"""Writing a set of output files into a directory all-or-nothing, and strict JSON (no NaN / inf)."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def jsonable(x: Any) -> Any:
    """`x` with non-finite floats replaced by None and tuples by lists, so json.dumps emits strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def dump_json(obj: Any, path: str) -> None:
    Path(path).write_text(json.dumps(jsonable(obj), indent=1, allow_nan=False) + '\n')


def write_atomically(out_dir: str, writers: dict[str, Callable[[str], None]]) -> dict[str, str]:
    """Calls writers[name](tmp_path) for each file name in a temp dir inside `out_dir`, then renames them all
    into `out_dir` in the given order (put the main file last). A failing writer leaves no new file behind."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f'--out: {out_dir} exists and is not a directory')
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix='.tmp-', dir=out))
    try:
        for name, write in writers.items():
            write(str(tmp / name))
        for name in writers:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {name: str(out / name) for name in writers}
