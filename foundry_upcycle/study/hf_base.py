"""The study on a real dense base (`StudyConfig.hf_base`): a Hugging Face Llama / Mistral directory takes the place
of the base the default study pretrains. What differs from the default lives here; the stages, arms, statistics
and report are the default's.

- Recipes: yamls/hf/{cpt,upcycle}.yaml (`hf_causal_lm`; the upcycling recipe adds the `upcycle:` block, which makes
  it `hf_upcycle_causal_lm`, a transformers Mixtral whose dense weights are tiled in when the run starts). The base
  directory is the recipes' `variables.model`, a path kept out of every stage hash: the dense stage hashes the
  directory's contents instead (`fingerprint`).
- Data: the built-in mix (or data.*_dir), tokenized with the base's own tokenizer (`DataConfig.tokenizer`).
- FLOPs: counted from config.json (`flops.param_breakdown` on a transformers config), the MoE's config being the
  one the model builds (`llama_to_mixtral.upcycled_mixtral_config`).
- Budgets: fractions of the FLOPs the base was pretrained with (`pretrain_tokens`, from its model card), as in the
  default study; a real base's pretraining is long, so the budgets a study can afford are small fractions.
- Inference: the models foundry's `hf_checkpointer` saved at the end of the runs (no export step).
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any, Mapping

HF_MODEL_NAMES = ('hf_causal_lm', 'hf_upcycle_causal_lm')
WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.json')


def is_hf_model(model: Mapping[str, Any]) -> bool:
    return model.get('name') in HF_MODEL_NAMES


def with_base(model: Mapping[str, Any], base: str) -> dict[str, Any]:
    """A model block (whose path may be the `<model>` placeholder) reading the base directory."""
    return {**copy.deepcopy(dict(model)), 'pretrained_model_name_or_path': str(Path(base).expanduser().absolute())}


def moe_model(dense_model: Mapping[str, Any], block: Mapping[str, Any], base: str) -> dict[str, Any]:
    """The `hf_upcycle_causal_lm` block the upcycle block makes of the dense `hf_causal_lm` block (its path kept as
    given); ValueError, naming the key, for what transformers' Mixtral cannot hold (checked on the real base)."""
    from foundry_upcycle.config import UpcycleConfig
    from foundry_upcycle.transforms import upcycled_hf_model_config
    moe, _ = upcycled_hf_model_config(with_base(dense_model, base), UpcycleConfig.from_mapping(block))
    moe['pretrained_model_name_or_path'] = dense_model['pretrained_model_name_or_path']
    return moe


def counted_configs(models: Mapping[str, Mapping[str, Any]], base: str) -> dict[str, dict[str, Any]]:
    """arm -> the transformers config its model builds (config.json dict), for the parameter and FLOP counts."""
    from foundry_upcycle.llama_to_mixtral import read_dense_config, upcycled_mixtral_config
    dense = read_dense_config(base, 'hf_base')
    out = {}
    for arm, model in models.items():
        up = model.get('upcycle')
        out[arm] = dense if not up else upcycled_mixtral_config(
            dense, up['num_experts'], up['top_k'], up.get('granularity', 1), up.get('grow', 1),
            up['load_balancing_loss_weight']).to_dict()
    return out


def fingerprint(base: str) -> dict[str, Any]:
    """What the base is, wherever it lives: sha256 of config.json, and each weight / index file's size and mtime
    (hashing gigabytes of weights on every run would cost minutes)."""
    root = Path(base).expanduser()
    out: dict[str, Any] = {'config': hashlib.sha256((root / 'config.json').read_bytes()).hexdigest()[:16]}
    for f in sorted(root.iterdir()):
        if f.is_file() and f.suffix in WEIGHT_SUFFIXES and f.name != 'config.json':
            st = f.stat()
            out[f.name] = [st.st_size, st.st_mtime_ns]
    return out


def dense_outputs(base: str, dense_model: Mapping[str, Any], pretrain_tokens: int) -> dict[str, Any]:
    """The dense stage's outputs: no checkpoint (the base directory is the model), the model block reading it."""
    return {'checkpoint': None, 'hf_dir': str(Path(base).expanduser().absolute()),
            'model': with_base(dense_model, base), 'steps': None, 'tokens': pretrain_tokens}


def saved_hf_dir(work: Path, steps: int) -> Path:
    """Where the recipes' `hf_checkpointer` (save_folder `<save_folder>/hf`) saved a run's final model."""
    path = work / 'checkpoints' / 'hf' / 'huggingface' / f'ba{steps}'
    if not (path / 'config.json').is_file():
        raise RuntimeError(f'the run has no Hugging Face model at {path}; the hf recipes\' hf_checkpointer callback '
                           'must save one at the end of the run (save_interval: max_duration)')
    return path
