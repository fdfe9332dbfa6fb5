"""Regenerates the study's shipped eval samples (foundry_upcycle/study/eval_data) from a full checkout of
llm-foundry's scripts/eval/local_data: at most 300 examples per file, a seeded sample kept in the original order.

    python scripts/sample_eval_data.py PATH/TO/local_data [OUT_DIR]

OUT_DIR defaults to foundry_upcycle/study/eval_data (the SOURCES.md there is left alone). Pure standard library.
"""
from __future__ import annotations

import random
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


def sample_lines(lines: list[str], path: str, k: int = MAX_EXAMPLES) -> list[str]:
    if len(lines) <= k:
        return lines
    keep = sorted(random.Random(f'foundry-upcycle:{path}').sample(range(len(lines)), k))
    return [lines[i] for i in keep]


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
    for rel in FILES:
        lines = (src / rel).read_text(encoding='utf-8').splitlines(keepends=True)
        kept = sample_lines([l for l in lines if l.strip()], rel)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(''.join(kept), encoding='utf-8')
        print(f'{rel}: {len(kept)} of {len(lines)}')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
