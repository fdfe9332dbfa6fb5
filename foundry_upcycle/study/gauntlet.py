"""Eval gauntlet v0.3 for foundry's ICL harness: task configs over the data that is present, and the core average.

`GAUNTLET_V03` and `TASKS_V03` follow llm-foundry's `scripts/eval/yamls/eval_gauntlet_v0.3.yaml` and
`tasks_v0.3.yaml` (task types renamed for foundry 0.22: `generation_task_with_answers`). Each task runs at the
gauntlet's few-shot count only (`arc_challenge` 3-shot, `hellaswag` 0-shot), the one the core average reads.

Core average: per task `(accuracy - random_baseline) / (1 - random_baseline)`, the mean within each category,
then the mean of the categories. Foundry's `EvalGauntlet` drops a whole category when any of its benchmarks has
no result; `gauntlet_scores` computes that number (`core_average_foundry`) and ours (`core_average`: the mean over
the tasks evaluated in each category, categories with none left out), and names what each one covers.

Pure Python (json, random): no torch, no llmfoundry.
"""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

log = logging.getLogger(__name__)

CATEGORIES = ('world_knowledge', 'commonsense_reasoning', 'language_understanding', 'symbolic_problem_solving',
              'reading_comprehension')

# category -> ((task, num_fewshot, random_baseline), ...), as in eval_gauntlet_v0.3.yaml
GAUNTLET_V03: dict[str, tuple[tuple[str, int, float], ...]] = {
    'world_knowledge': (
        ('jeopardy', 3, 0.0), ('bigbench_qa_wikidata', 3, 0.0), ('arc_easy', 3, 0.25),
        ('arc_challenge', 3, 0.25), ('mmlu', 5, 0.25), ('triviaqa_sm_sub', 3, 0.0)),
    'commonsense_reasoning': (
        ('copa', 0, 0.5), ('siqa', 3, 0.5), ('commonsense_qa', 0, 0.25), ('piqa', 0, 0.5),
        ('openbook_qa', 10, 0.25), ('bigbench_strange_stories', 0, 0.5), ('bigbench_strategy_qa', 0, 0.5)),
    'language_understanding': (
        ('lambada_openai', 0, 0.0), ('hellaswag', 0, 0.25), ('winograd', 3, 0.5), ('winogrande', 5, 0.5)),
    'symbolic_problem_solving': (
        ('bigbench_elementary_math_qa', 1, 0.25), ('bigbench_dyck_languages', 5, 0.0), ('bigbench_operators', 3, 0.0),
        ('simple_arithmetic_withspaces', 5, 0.0), ('simple_arithmetic_nospaces', 5, 0.0), ('gsm8k', 0, 0.0),
        ('svamp', 5, 0.0), ('agi_eval_lsat_ar', 5, 0.25)),
    'reading_comprehension': (
        ('squad', 3, 0.0), ('boolq', 0, 0.5), ('coqa', 0, 0.0), ('agi_eval_lsat_rc', 5, 0.25),
        ('agi_eval_lsat_lr', 5, 0.25), ('agi_eval_sat_en', 5, 0.25)),
}

_ANSWER = {'continuation_delimiter': '\nAnswer: '}
_COT = {'cot_delimiter': 'The answer is ', 'continuation_delimiter': '\n\nA:', 'do_normalization': False,
        'early_stopping_criteria': ['\n\n', 'Question:']}
# task -> (file under local_data, icl_task_type, extra icl_tasks keys), as in tasks_v0.3.yaml
TASKS_V03: dict[str, tuple[str, str, dict[str, Any]]] = {
    'jeopardy': ('world_knowledge/jeopardy_all.jsonl', 'language_modeling', {**_ANSWER, 'has_categories': True}),
    'bigbench_qa_wikidata': ('world_knowledge/bigbench_qa_wikidata.jsonl', 'language_modeling', {}),
    'arc_easy': ('world_knowledge/arc_easy.jsonl', 'multiple_choice', _ANSWER),
    'arc_challenge': ('world_knowledge/arc_challenge.jsonl', 'multiple_choice', _ANSWER),
    'mmlu': ('world_knowledge/mmlu.jsonl', 'multiple_choice', {**_ANSWER, 'has_categories': True}),
    'triviaqa_sm_sub': ('world_knowledge/triviaqa_sm_sub.jsonl', 'generation_task_with_answers',
                        {'do_normalization': True}),
    'copa': ('commonsense_reasoning/copa.jsonl', 'multiple_choice', {}),
    'siqa': ('commonsense_reasoning/siqa.jsonl', 'multiple_choice', {}),
    'commonsense_qa': ('commonsense_reasoning/commonsense_qa.jsonl', 'multiple_choice', {}),
    'piqa': ('commonsense_reasoning/piqa.jsonl', 'multiple_choice', _ANSWER),
    'openbook_qa': ('commonsense_reasoning/openbook_qa.jsonl', 'multiple_choice', {}),
    'bigbench_strange_stories': ('commonsense_reasoning/bigbench_strange_stories.jsonl', 'multiple_choice', {}),
    'bigbench_strategy_qa': ('commonsense_reasoning/bigbench_strategy_qa.jsonl', 'multiple_choice', {}),
    'lambada_openai': ('language_understanding/lambada_openai.jsonl', 'language_modeling', {}),
    'hellaswag': ('language_understanding/hellaswag.jsonl', 'multiple_choice', {}),
    'winograd': ('language_understanding/winograd_wsc.jsonl', 'schema', {}),
    'winogrande': ('language_understanding/winogrande.jsonl', 'schema', {}),
    'bigbench_elementary_math_qa': ('symbolic_problem_solving/bigbench_elementary_math_qa.jsonl', 'multiple_choice',
                                    {}),
    'bigbench_dyck_languages': ('symbolic_problem_solving/bigbench_dyck_languages.jsonl', 'language_modeling', {}),
    'bigbench_operators': ('symbolic_problem_solving/bigbench_operators.jsonl', 'language_modeling', {}),
    'simple_arithmetic_withspaces': ('symbolic_problem_solving/simple_arithmetic_withspaces.jsonl',
                                     'language_modeling', {}),
    'simple_arithmetic_nospaces': ('symbolic_problem_solving/simple_arithmetic_nospaces.jsonl', 'language_modeling',
                                   {}),
    'gsm8k': ('symbolic_problem_solving/gsm8k_prepended_8shot.jsonl', 'generation_task_with_answers',
              {**_COT, 'question_prelimiter': ''}),
    'svamp': ('symbolic_problem_solving/svamp.jsonl', 'generation_task_with_answers',
              {**_COT, 'question_prelimiter': 'Question: '}),
    'agi_eval_lsat_ar': ('symbolic_problem_solving/agi_eval_lsat_ar.jsonl', 'multiple_choice', {}),
    'squad': ('reading_comprehension/squad.jsonl', 'language_modeling', {}),
    'boolq': ('reading_comprehension/boolq.jsonl', 'multiple_choice', _ANSWER),
    'coqa': ('reading_comprehension/coqa.jsonl', 'language_modeling', {}),
    'agi_eval_lsat_rc': ('reading_comprehension/agi_eval_lsat_rc.jsonl', 'multiple_choice', {}),
    'agi_eval_lsat_lr': ('reading_comprehension/agi_eval_lsat_lr.jsonl', 'multiple_choice', {}),
    'agi_eval_sat_en': ('reading_comprehension/agi_eval_sat_en.jsonl', 'multiple_choice', {}),
}

BENCHMARKS: dict[str, tuple[str, int, float]] = {  # task -> (category, num_fewshot, random_baseline)
    name: (cat, shots, base) for cat, tasks in GAUNTLET_V03.items() for name, shots, base in tasks}

# The CPU study's default: cheap tasks, at least one per category (so our core average spans all five), the costly
# ones left out. Cost is about (examples x answer choices) forward passes of the full sequence. Measured on the tiny
# study model (d_model 128, 4 layers, seq 128, vocab 2048), 100 examples per task, 1 torch thread on a shared 2-core
# machine: 0.7-1.9 s per task (arc_easy, 4 choices: 3-4.5 s); the whole eval, CE on 2 x 64 samples included,
# ~15 s dense and ~18-20 s with 8 experts top-2. commonsense_qa, openbook_qa and the agi_eval tasks cost like arc_easy.
# None of the five categories is complete in it, so foundry's own core average is only defined with more tasks
# (with llm-foundry's small local_data, `all` completes commonsense_reasoning).
DEFAULT_TASKS = ('arc_easy', 'bigbench_qa_wikidata', 'copa', 'piqa', 'lambada_openai', 'winograd',
                 'simple_arithmetic_nospaces', 'boolq')


def default_local_data() -> Path:
    """`../shared/foundry_eval/local_data` next to this repository (the project's CI layout)."""
    return Path(__file__).resolve().parents[3] / 'shared' / 'foundry_eval' / 'local_data'


@dataclass(frozen=True)
class GauntletSpec:
    """Which v0.3 tasks to run, from where, on how many examples each.

    local_data: a copy of llm-foundry's `scripts/eval/local_data` (`<category>/<file>.jsonl`).
    tasks: 'default' (DEFAULT_TASKS), 'all' (every v0.3 task) or a list of v0.3 task names.
    max_examples_per_task: evaluate a seeded sample of this many examples per task (None: all of them).
    seed: the sample's seed.
    """

    local_data: str = field(default_factory=lambda: str(default_local_data()))
    tasks: Union[str, tuple[str, ...]] = 'default'
    max_examples_per_task: Optional[int] = 100
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.local_data, (str, os.PathLike)) or not Path(self.local_data).is_dir():
            raise ValueError(
                f'eval.local_data: {self.local_data} is not a directory; pass a checkout of llm-foundry\'s '
                'scripts/eval/local_data (folders world_knowledge/, commonsense_reasoning/, ...)',
            )
        object.__setattr__(self, 'local_data', str(self.local_data))
        if isinstance(self.tasks, str):
            if self.tasks not in ('default', 'all'):
                raise ValueError(f"eval.tasks: expected 'default', 'all' or a list of task names, got {self.tasks!r}")
        else:
            tasks = tuple(self.tasks)
            unknown = [t for t in tasks if t not in TASKS_V03]
            if unknown or not tasks:
                raise ValueError(f'eval.tasks: unknown task(s) {unknown} (or an empty list); '
                                 f'gauntlet v0.3 tasks are {sorted(TASKS_V03)}')
            object.__setattr__(self, 'tasks', tasks)
        n = self.max_examples_per_task
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f'eval.max_examples_per_task: must be a positive integer or null, got {n!r}')
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f'eval.seed: must be an integer, got {self.seed!r}')

    @classmethod
    def from_mapping(cls, block: Optional[Mapping[str, Any]]) -> 'GauntletSpec':
        block = dict(block or {})
        allowed = ['local_data', 'tasks', 'max_examples_per_task', 'seed']
        unknown = sorted(set(block) - set(allowed))
        if unknown:
            raise ValueError(f'eval: unknown key(s) {unknown}; allowed keys are {allowed}')
        if isinstance(block.get('tasks'), (list, tuple)):
            block['tasks'] = tuple(block['tasks'])
        return cls(**block)

    def to_mapping(self) -> dict[str, Any]:
        tasks = self.tasks if isinstance(self.tasks, str) else list(self.tasks)
        return {'local_data': self.local_data, 'tasks': tasks, 'max_examples_per_task': self.max_examples_per_task,
                'seed': self.seed}

    def selected(self) -> list[str]:
        if self.tasks == 'all':
            return list(BENCHMARKS)
        return list(DEFAULT_TASKS if self.tasks == 'default' else self.tasks)

    def data_file(self, task: str) -> Path:
        return Path(self.local_data) / TASKS_V03[task][0]


def missing_tasks(local_data: Union[str, os.PathLike]) -> list[str]:
    """The v0.3 gauntlet tasks whose data file is absent under `local_data`, in gauntlet order."""
    return [t for t in BENCHMARKS if not (Path(local_data) / TASKS_V03[t][0]).is_file()]


def answer_texts(example: Mapping[str, Any], icl_task_type: str, extra: Mapping[str, Any]) -> list[str]:
    """The texts foundry places after the context: scored continuations, or the longest generation answers."""
    if icl_task_type == 'multiple_choice':
        return [str(c) for c in example['choices']]
    if icl_task_type in ('schema', 'language_modeling'):
        return [str(example['continuation'])]
    answers = [str(a) for a in [example['answer'], *example.get('aliases', [])]]
    cot = example.get('chain_of_thought')
    return [f'{cot}{extra.get("cot_delimiter", "")}{a}' for a in answers] if cot else answers


def answer_reserve(icl_task_type: str, extra: Mapping[str, Any]) -> int:
    """Tokens foundry adds to the longest generation answer (its `_MAX_ANSWER_BUFFER_LENGTH` with a CoT delimiter)."""
    return 10 if icl_task_type == 'generation_task_with_answers' and extra.get('cot_delimiter') else 0


@dataclass(frozen=True)
class PreparedGauntlet:
    """What `prepare_gauntlet` wrote: foundry's `icl_tasks` list and `eval_gauntlet` block, and what they cover."""

    icl_tasks: list[dict[str, Any]]
    eval_gauntlet: dict[str, Any]
    tasks: list[str]                 # evaluated, in gauntlet order
    missing: list[str]               # v0.3 tasks without a data file under local_data
    not_selected: list[str]          # present but left out by the task selection
    num_examples: dict[str, int]     # task -> examples evaluated
    too_long: dict[str, int]         # task -> examples skipped: an answer longer than the sequence


def eval_gauntlet_config() -> dict[str, Any]:
    """The full v0.3 `eval_gauntlet` block; foundry drops the categories we cannot complete."""
    return {
        'weighting': 'EQUAL',
        'subtract_random_baseline': True,
        'rescale_accuracy': True,
        'averages': {'core_average': list(CATEGORIES)},
        'categories': [
            {'name': cat, 'benchmarks': [{'name': n, 'num_fewshot': s, 'random_baseline': b} for n, s, b in tasks]}
            for cat, tasks in GAUNTLET_V03.items()
        ],
    }


def _read_examples(path: Path) -> list[str]:
    with open(path, encoding='utf-8') as f:
        return [line for line in (raw.strip() for raw in f) if line]


def _subset(lines: list[str], n: Optional[int], seed: int,
            fits: Optional[Callable[[Mapping[str, Any]], bool]]) -> tuple[list[str], int]:
    """A seeded sample (original order kept) of the examples that fit; and how many did not fit."""
    keep = lines if fits is None else [ln for ln in lines if fits(json.loads(ln))]
    too_long = len(lines) - len(keep)
    if n is not None and n < len(keep):
        idx = sorted(random.Random(seed).sample(range(len(keep)), n))
        keep = [keep[i] for i in idx]
    return keep, too_long


def _fits(icl_type: str, extra: Mapping[str, Any], count_tokens: Callable[[str], int],
          seq_len: int) -> Callable[[Mapping[str, Any]], bool]:
    """Whether every answer of an example leaves at least one context token in `seq_len` (foundry fails otherwise:
    an exception for a scored continuation, ragged batches for a generation task)."""
    reserve = answer_reserve(icl_type, extra)
    return lambda ex: all(count_tokens(a) + reserve < seq_len for a in answer_texts(ex, icl_type, extra))


def prepare_gauntlet(spec: GauntletSpec, out_dir: Union[str, os.PathLike],
                     count_tokens: Optional[Callable[[str], int]] = None,
                     seq_len: Optional[int] = None) -> PreparedGauntlet:
    """Writes each selected, present task's examples to `out_dir/<category>/<file>.jsonl` and returns the configs.

    count_tokens(text) -> int, with seq_len: examples with an answer too long for the sequence are skipped and
    counted in `too_long` (count an upper bound: foundry may tokenize the answer with a leading space).
    """
    if (count_tokens is None) != (seq_len is None):
        raise ValueError('prepare_gauntlet: pass both count_tokens and seq_len, or neither')
    out = Path(out_dir)
    missing = missing_tasks(spec.local_data)
    selected = [t for t in spec.selected() if t not in missing]
    asked_missing = [t for t in spec.selected() if t in missing]
    if asked_missing and spec.tasks != 'all':
        log.warning('eval: no data under %s for %s; they are reported as missing', spec.local_data, asked_missing)
    icl_tasks, num_examples, too_long = [], {}, {}
    for task in BENCHMARKS:  # gauntlet order
        if task not in selected:
            continue
        rel, icl_type, extra = TASKS_V03[task]
        fits = None if count_tokens is None else _fits(icl_type, extra, count_tokens, seq_len)
        lines, skipped = _subset(_read_examples(spec.data_file(task)), spec.max_examples_per_task, spec.seed, fits)
        if not lines:
            log.warning('eval: task %s has no example whose answer fits the sequence; skipping it', task)
            continue
        if skipped:
            log.warning('eval: task %s: skipped %d example(s) whose answer is longer than the sequence', task,
                        skipped)
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text('\n'.join(lines) + '\n', encoding='utf-8')
        num_examples[task], too_long[task] = len(lines), skipped
        icl_tasks.append({'label': task, 'dataset_uri': str(target), 'num_fewshot': [BENCHMARKS[task][1]],
                          'icl_task_type': icl_type, **extra})
    evaluated = [t['label'] for t in icl_tasks]
    return PreparedGauntlet(
        icl_tasks=icl_tasks, eval_gauntlet=eval_gauntlet_config(), tasks=evaluated, missing=missing,
        not_selected=[t for t in BENCHMARKS if t not in missing and t not in spec.selected()],
        num_examples=num_examples, too_long=too_long)


def rescaled(accuracy: float, random_baseline: float) -> float:
    return (accuracy - random_baseline) / (1.0 - random_baseline)


def gauntlet_scores(accuracies: Mapping[str, float]) -> dict[str, Any]:
    """Both core averages from per-task accuracies (task name -> accuracy; non-v0.3 names are ignored).

    Returns {'core_average': ours or None, 'core_average_foundry': foundry's or None,
    'categories': {category: {'score', 'score_foundry', 'tasks', 'missing'}},
    'categories_dropped_by_foundry': [...], 'categories_without_tasks': [...]}.
    """
    categories, ours, theirs = {}, [], []
    for cat, tasks in GAUNTLET_V03.items():
        scores = [rescaled(accuracies[n], base) for n, _, base in tasks if n in accuracies]
        missing = [n for n, _, _ in tasks if n not in accuracies]
        score = sum(scores) / len(scores) if scores else None
        score_foundry = score if not missing else None
        categories[cat] = {'score': score, 'score_foundry': score_foundry,
                           'tasks': [n for n, _, _ in tasks if n in accuracies], 'missing': missing}
        if score is not None:
            ours.append(score)
        if score_foundry is not None:
            theirs.append(score_foundry)
    return {
        'core_average': sum(ours) / len(ours) if ours else None,
        'core_average_foundry': sum(theirs) / len(theirs) if theirs else None,
        'categories': categories,
        'categories_dropped_by_foundry': [c for c, v in categories.items() if v['score_foundry'] is None],
        'categories_without_tasks': [c for c, v in categories.items() if v['score'] is None],
    }
