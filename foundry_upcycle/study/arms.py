"""The phase-2 arms a study can train from the dense base, as data: the one place that knows them.

An arm is a recipe kind (`cpt`: the dense CPT recipe; `upcycle`: the same recipe plus its `upcycle:` block) plus the
overrides of the upcycle block that make it a variant, and how the report names and draws it. Every stage iterates
over the study's arms (`StudyConfig.arms`, default ('cpt', 'upcycle')): the plan (steps at matched FLOPs), the runs,
the per-seed statistics (each arm against the baseline arm, paired by seed) and the report. A new variant is one
`register(Arm(...))` call (e.g. `Arm('drop0.5', 'upcycle', 'Drop-Upcycling 0.5', 'drop', '#2ca02c',
upcycle={...})`) and its name in `StudyConfig.arms`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

RECIPE_KINDS = ('cpt', 'upcycle')
BASELINE = 'cpt'              # the arm every other arm is compared against
PRIMARY = 'upcycle'           # the arm the cost report and the inference benchmark use


@dataclass(frozen=True)
class Arm:
    name: str                                  # run names, results.json `arms[].arm`, stage folders
    recipe: str                                # 'cpt' | 'upcycle': which shipped recipe it trains with
    label: str                                 # figure legends and tables
    short: str                                 # sentences ("CPT ahead")
    color: str
    upcycle: Mapping[str, Any] = field(default_factory=dict)   # upcycle-block overrides of this variant

    def __post_init__(self):
        if self.recipe not in RECIPE_KINDS:
            raise ValueError(f'arm {self.name}: recipe must be one of {RECIPE_KINDS}, got {self.recipe!r}')
        if self.upcycle and self.recipe != 'upcycle':
            raise ValueError(f'arm {self.name}: upcycle overrides need the upcycle recipe')

    @property
    def is_moe(self) -> bool:
        return self.recipe == 'upcycle'


_REGISTRY: dict[str, Arm] = {}


def register(arm: Arm) -> Arm:
    if arm.name in _REGISTRY and _REGISTRY[arm.name] != arm:
        raise ValueError(f'arm {arm.name!r} is already registered differently')
    _REGISTRY[arm.name] = arm
    return arm


register(Arm('cpt', 'cpt', 'CPT (dense)', 'CPT', '#1f77b4'))
register(Arm('upcycle', 'upcycle', 'upcycled (MoE)', 'upcycling', '#d62728'))
DEFAULT_ARMS = ('cpt', 'upcycle')


# Variants of the upcycle block by name (`foundry-upcycle study --variants paper,drop0.5,granular2,every2`):
# family -> (upcycle-block key, value type, label, colours). `paper` is the primary arm, `upcycle`.
PAPER = 'paper'
VARIANT_FAMILIES = {
    'drop': ('drop_ratio', float, 'Drop-Upcycling r={}', ('#2ca02c', '#98df8a')),
    'granular': ('granularity', int, 'fine-grained G={}', ('#9467bd', '#c5b0d5')),
    'every': ('moe_layers', int, 'MoE every {} blocks', ('#8c564b', '#c49c94')),
}
_VARIANT = re.compile(r'(?P<family>[a-z]+)(?P<value>\d+(?:\.\d+)?)')


def variant(name: str) -> Arm:
    """The arm of a variant name (`drop0.5`, `granular2`, `every2`): the paper's recipe plus one block key."""
    m = _VARIANT.fullmatch(name)
    if m is None or m['family'] not in VARIANT_FAMILIES:
        raise ValueError(f'arm {name!r} is not known; known arms: {sorted(_REGISTRY)}, or a variant '
                         f'{"|".join(VARIANT_FAMILIES)}<value> (e.g. drop0.5, granular2, every2)')
    key, kind, label, colours = VARIANT_FAMILIES[m['family']]
    try:
        value = kind(m['value'])
    except ValueError:
        raise ValueError(f'arm {name!r}: {m["family"]} takes {kind.__name__} values, got {m["value"]!r}') from None
    from foundry_upcycle.config import UpcycleConfig
    UpcycleConfig.from_mapping({key: value})    # ValueError naming upcycle.<key> for a bad value
    colour = colours[sum(1 for a in _REGISTRY if a.startswith(m['family'])) % len(colours)]
    return Arm(name, 'upcycle', label.format(value), name, colour, upcycle={key: value})


def get(name: str) -> Arm:
    if name not in _REGISTRY:
        register(variant(name))
    return _REGISTRY[name]


def variant_arms(names: str | list[str]) -> tuple[str, ...]:
    """`--variants` -> the study's arms: CPT, the paper's recipe, then each named variant once."""
    items = [n.strip() for n in (names.split(',') if isinstance(names, str) else names) if n.strip()]
    out = [BASELINE, PRIMARY]
    for n in items:
        n = PRIMARY if n == PAPER else n
        get(n)
        if n == BASELINE:
            raise ValueError('--variants: CPT is always the baseline; list upcycling variants only')
        if n not in out:
            out.append(n)
    return tuple(out)


def known() -> list[str]:
    return sorted(_REGISTRY)


def label(name: str) -> str:
    """The arm's label; a name that is not registered (e.g. an old results.json) is its own label."""
    return _REGISTRY[name].label if name in _REGISTRY else name


def short(name: str) -> str:
    return _REGISTRY[name].short if name in _REGISTRY else name


def color(name: str, index: int = 0) -> str:
    fallback = ('#2ca02c', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22')
    return _REGISTRY[name].color if name in _REGISTRY else fallback[index % len(fallback)]


def run_name(arm: str, budget: float, lr: float, seed_index: int) -> str:
    """The name of one phase-2 run (its stage folder `arms/<name>`)."""
    return f'{arm}-b{budget:g}-lr{lr:g}-s{seed_index}'
