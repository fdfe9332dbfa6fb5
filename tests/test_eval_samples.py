"""The shipped eval samples are what scripts/sample_eval_data.py makes of llm-foundry's local_data."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

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


@pytest.mark.skipif(not LOCAL_DATA.is_dir(), reason=f'llm-foundry\'s full eval local_data is not at {LOCAL_DATA} '
                    '(a clone without ../shared): nothing to regenerate the samples from')
def test_shipped_samples_regenerate_byte_for_byte(tmp_path):
    assert S.main([str(LOCAL_DATA), str(tmp_path)]) == 0
    for rel in S.FILES:
        assert (tmp_path / rel).read_bytes() == (shipped_eval_data() / rel).read_bytes(), rel
