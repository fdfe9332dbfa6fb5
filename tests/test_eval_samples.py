"""The shipped eval samples are what scripts/sample_eval_data.py makes of llm-foundry's local_data."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path


from foundry_upcycle.study import gauntlet as G
from foundry_upcycle.study.config import shipped_eval_data

REPO = Path(__file__).resolve().parents[1]
LOCAL_DATA = G.default_local_data()
_spec = importlib.util.spec_from_file_location('sample_eval_data', REPO / 'scripts' / 'sample_eval_data.py')
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)


def test_sample_is_seeded_bounded_and_keeps_the_order():
    lines = [f'{{"i": {i}}}\n' for i in range(1000)]
    kept = S.sample_lines(lines, 'x/y.jsonl')
    assert len(kept) == S.MAX_EXAMPLES and kept == S.sample_lines(lines, 'x/y.jsonl')
    idx = [json.loads(l)['i'] for l in kept]
    assert idx == sorted(idx) and kept != S.sample_lines(lines, 'x/z.jsonl')    # the seed is the file's path
    assert S.sample_lines(lines[:50], 'x/y.jsonl') == lines[:50]


def test_every_shipped_file_is_listed_with_a_licence():
    shipped = sorted(p.relative_to(shipped_eval_data()).as_posix() for p in shipped_eval_data().rglob('*.jsonl'))
    assert shipped == sorted(S.FILES)
    sources = (shipped_eval_data() / 'SOURCES.md').read_text()
    for rel in S.FILES:
        row = next(l for l in sources.splitlines() if l.startswith(f'| {rel} |'))
        assert row.rstrip().endswith('|') and len([c for c in row.split('|') if c.strip()]) == 4, row


PROVENANCE = json.loads((shipped_eval_data() / S.PROVENANCE).read_text())


def synthetic_local_data(root: Path) -> Path:
    """A small local_data with foundry's layout, built from the committed provenance: every .jsonl file the real
    checkout held (empty), and each sampled source with its recorded number of lines, the shipped lines at the
    recorded positions and filler lines elsewhere. Regenerating the samples from it exercises the sampler against
    the positions recorded from the real files."""
    for rel in PROVENANCE['jsonl_files_in_local_data']:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text('')
    for rel, info in PROVENANCE['files'].items():
        shipped = (shipped_eval_data() / rel).read_text(encoding='utf-8').splitlines(keepends=True)
        lines = [f'{{"filler": {i}}}\n' for i in range(info['source_lines'])]
        for i, line in zip(info['kept'], shipped, strict=True):
            lines[i] = line
        (root / rel).write_text(''.join(lines), encoding='utf-8')
    return root


def _checkouts(tmp_path: Path) -> list[Path]:
    """The synthetic local_data, and llm-foundry's full one where this checkout has it (../shared)."""
    return [synthetic_local_data(tmp_path / 'synthetic')] + ([LOCAL_DATA] if LOCAL_DATA.is_dir() else [])


def test_shipped_samples_regenerate_byte_for_byte(tmp_path):
    for i, local in enumerate(_checkouts(tmp_path)):
        out = tmp_path / f'out{i}'
        assert S.main([str(local), str(out)]) == 0
        for rel in S.FILES:
            assert (out / rel).read_bytes() == (shipped_eval_data() / rel).read_bytes(), (local, rel)
        if local == LOCAL_DATA:                   # the committed fingerprints are the real checkout's
            assert json.loads((out / S.PROVENANCE).read_text()) == PROVENANCE
    for rel, info in PROVENANCE['files'].items():  # the shipped files are the ones fingerprinted
        assert hashlib.sha256((shipped_eval_data() / rel).read_bytes()).hexdigest() == info['sample_sha256'], rel


def test_missing_tasks_in_the_shared_local_data(tmp_path):
    for local in _checkouts(tmp_path):
        assert G.missing_tasks(local) == ['mmlu', 'hellaswag', 'bigbench_elementary_math_qa', 'squad', 'coqa']


def test_shipped_samples_are_lines_of_foundrys_files(tmp_path):
    """Each shipped line is the source line the seeded sampler picks: the recorded positions are the sampler's for
    the recorded line count, and, with the real checkout, its lines at those positions are the shipped ones."""
    for rel, info in PROVENANCE['files'].items():
        assert S.kept_indices(info['source_lines'], rel) == info['kept'], rel
        assert len((shipped_eval_data() / rel).read_text(encoding='utf-8').splitlines()) == len(info['kept'])
    for local in _checkouts(tmp_path):
        for task in G.DEFAULT_TASKS:
            rel = G.TASKS_V03[task][0]
            full = [l for l in (local / rel).read_text(encoding='utf-8').splitlines() if l.strip()]
            kept = [full[i] for i in PROVENANCE['files'][rel]['kept']]
            assert kept == (shipped_eval_data() / rel).read_text(encoding='utf-8').splitlines(), (local, task)
