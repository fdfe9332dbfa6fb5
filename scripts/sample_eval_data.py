"""Regenerates the study's shipped eval samples (foundry_upcycle/study/eval_data) from a full checkout of
llm-foundry's scripts/eval/local_data: at most 300 examples per file, a seeded sample kept in the original order.

    python scripts/sample_eval_data.py PATH/TO/local_data [OUT_DIR]

OUT_DIR defaults to foundry_upcycle/study/eval_data (the SOURCES.md there is left alone). Beside the samples it
writes PROVENANCE.json: each source file's sha256 and line count, the lines kept, each sample's sha256, and the
.jsonl files the checkout holds, so that a clone without the checkout can still test the samples against their
sources' fingerprints (tests/test_eval_samples.py). Pure standard library.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from pathlib import Path

MAX_EXAMPLES = 300
FILES = (
    'world_knowledge/arc_easy.jsonl',
    'world_knowledge/bigbench_qa_wikidata.jsonl',
    'commonsense_reasoning/copa.jsonl',
    'commonsense_reasoning/piqa.jsonl',
    'language_understanding/lambada_openai.jsonl',
    'language_understanding/winograd_wsc.jsonl',
    'symbolic_problem_solving/simple_arithmetic_nospaces.jsonl',
    'reading_comprehension/boolq.jsonl',
)


PROVENANCE = 'PROVENANCE.json'


def kept_indices(n: int, path: str, k: int = MAX_EXAMPLES) -> list[int]:
    """Which of a file's n (non-blank) lines the sample keeps: all of them, or a seeded k, in order."""
    return list(range(n)) if n <= k else sorted(random.Random(f'foundry-upcycle:{path}').sample(range(n), k))


def sample_lines(lines: list[str], path: str, k: int = MAX_EXAMPLES) -> list[str]:
    return [lines[i] for i in kept_indices(len(lines), path, k)]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def provenance(src: Path, samples: dict[str, str]) -> dict:
    files = {}
    for rel in FILES:
        data = (src / rel).read_bytes()
        lines = [l for l in data.decode('utf-8').splitlines(keepends=True) if l.strip()]
        files[rel] = {'source_sha256': _sha256(data), 'source_lines': len(lines),
                      'kept': kept_indices(len(lines), rel), 'sample_sha256': _sha256(samples[rel].encode('utf-8'))}
    present = sorted(p.relative_to(src).as_posix() for p in src.rglob('*.jsonl'))
    return {'generator': 'scripts/sample_eval_data.py', 'max_examples': MAX_EXAMPLES, 'files': files,
            'jsonl_files_in_local_data': present}


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    src = Path(argv[0])
    out = Path(argv[1]) if len(argv) == 2 else Path(__file__).resolve().parents[1] / 'foundry_upcycle/study/eval_data'
    for rel in FILES:
        if not (src / rel).is_file():
            print(f'{src / rel}: missing (pass a checkout of llm-foundry\'s scripts/eval/local_data)', file=sys.stderr)
            return 1
    samples = {}
    for rel in FILES:
        lines = (src / rel).read_text(encoding='utf-8').splitlines(keepends=True)
        kept = sample_lines([l for l in lines if l.strip()], rel)
        samples[rel] = ''.join(kept)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(samples[rel], encoding='utf-8')
        print(f'{rel}: {len(kept)} of {len(lines)}')
    text = re.sub(r'\[\s*(\d[\d,\s]*?)\s*\]', lambda m: '[' + ', '.join(m.group(1).split()).replace(',,', ',') + ']',
                  json.dumps(provenance(src, samples), indent=1))
    (out / PROVENANCE).write_text(text + '\n', encoding='utf-8')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
