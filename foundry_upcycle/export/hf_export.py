"""Writing HF checkpoints of MPT models: `export_checkpoint` (file + recipe), `export_state_dict` (a live model),
streamed one job at a time. The config rules are in `mpt_arch.py` / `target_check.py`, the weight mapping in
`mpt_to_hf.py`.

MPT (foundry `mpt_causal_lm` / `mpt_upcycle_causal_lm`) -> Hugging Face Llama, Mistral, Mixtral or DBRX.

Targets and what they need from the MPT model config:
  llama / mistral  dense `mptglu`, SiLU, RMSNorm, rope                     -> LlamaForCausalLM / MistralForCausalLM
  mixtral          `torch_dmoe`/`mb_dmoe` GLU, SiLU, RMSNorm, rope, top-k weights renormalised (p=1)
                                                                            -> MixtralForCausalLM
  dbrx             `torch_dmoe`/`mb_dmoe` GLU, bias-free LayerNorm (eps 1e-5), rope, untied -> DbrxForCausalLM
All targets: no biases, no ALiBi / learned positions, plain softmax attention. Anything else is refused with a
ValueError naming the config key, rather than exported into a model that computes something different.

Shapes: V vocab, D d_model, F ffn_hidden_size, E experts, H heads, KV kv heads, hd = D / H head dim.
  MPT   attn.Wqkv [(H + 2 KV) hd, D] (q, k, v stacked), ffn.experts.mlp.w1/v1/w2 [E F, D]
  Llama self_attn.q_proj [H hd, D], k_proj/v_proj [KV hd, D];  Mixtral experts.{e}.w1/w3 [F, D], w2 [D, F]
  DBRX  keeps MPT's fused Wqkv and [E F, D] expert tensors.
Rope: MPT's `rope_impl: hf` is transformers' LlamaRotaryEmbedding with rotate-half (GPT-NeoX) pairing, the
convention of all four targets; `dail` (non-interleaved) is the same rotation.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from foundry_upcycle.atomic import atomic_output_dir
from foundry_upcycle.export.mpt_arch import (ATTN_DEFAULTS, MPT_DEFAULTS, MPTArch, Problems,  # noqa: F401
                                             parse_mpt_config, resolve_model_config)
from foundry_upcycle.export.mpt_to_hf import check_state_dict, convert_state_dict, plan_export  # noqa: F401
from foundry_upcycle.export.target_check import (check_target, engine_support, hf_config,  # noqa: F401
                                                 vllm_differences)
from foundry_upcycle.export.targets import ARCHITECTURES, ENGINES_FILE, TARGETS, parse_dtype  # noqa: F401
from foundry_upcycle.export.writer import write_sharded
from foundry_upcycle.jobs import MemorySource
from foundry_upcycle.reader import open_source

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def _save_tokenizer(tokenizer_dir: str, out: Path, config) -> None:
    from transformers import AutoTokenizer
    src = Path(tokenizer_dir).expanduser()
    if not src.is_dir():
        raise ValueError(f'tokenizer: {tokenizer_dir} is not a directory')
    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except Exception as e:  # transformers raises OSError / ValueError / others for unreadable dirs
        raise ValueError(f'tokenizer: {tokenizer_dir} is not a loadable tokenizer directory ({e})') from None
    if len(tok) > config.vocab_size:
        raise ValueError(f'tokenizer: {tokenizer_dir} has {len(tok)} tokens, more than vocab_size={config.vocab_size}')
    tok.save_pretrained(str(out))
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id


def export_state_dict(state_dict: Mapping[str, torch.Tensor], model_cfg: Mapping[str, Any], out: str | os.PathLike,
                      target: str = 'auto', tokenizer: Optional[str] = None, overwrite: bool = False,
                      dtype: Optional[torch.dtype] = None, upcycle: Optional[Mapping[str, Any]] = None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
                      allow_inexact_engines: bool = False) -> Path:
    """Writes an HF model directory (config.json, safetensors, generation config, tokenizer) atomically.

    model_cfg: the recipe's `model:` block (or MPTConfig.to_dict()); upcycle: the recipe's `upcycle:` block if
    the checkpoint was trained from a dense recipe with one. dtype: cast weights (default: keep). The tensors
    are read, converted and written one job at a time (see `export_source`).
    """
    return export_source(MemorySource(state_dict), model_cfg, out, target, tokenizer, overwrite, dtype, upcycle,
                         max_shard_bytes, progress, allow_inexact_engines)


def export_source(source, model_cfg: Mapping[str, Any], out: str | os.PathLike, target: str = 'auto',
                  tokenizer: Optional[str] = None, overwrite: bool = False, dtype: Optional[torch.dtype] = None,
                  upcycle: Optional[Mapping[str, Any]] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  progress: bool = True, allow_inexact_engines: bool = False) -> Path:
    """Streams an MPT tensor source (`jobs.MemorySource` / `reader.SafetensorsSource`) into an HF directory.

    Memory: one job at a time (one MPT tensor and what it becomes; the largest is one layer's [E F, D] expert
    tensor), whatever the depth. `engines.json` in the output says which serving engines compute the export
    exactly (see `engine_support`).
    """
    from transformers import GenerationConfig

    target, arch = check_target(resolve_model_config(model_cfg, upcycle), target)
    support = engine_support(arch, target, allow_inexact_engines)
    jobs = plan_export(source, arch, target, dtype)
    config = hf_config(arch, target, jobs[0].specs[0].dtype)
    with atomic_output_dir(out, tag='hf-export', overwrite=overwrite) as tmp:
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp, config)
        write_sharded(tmp, jobs, max_shard_bytes, desc=f'exporting {target}', progress=progress)
        config.save_pretrained(str(tmp))
        GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
        (tmp / ENGINES_FILE).write_text(json.dumps(support, indent=1) + '\n')
    log.info('exported %s (%d tensors) to %s', ARCHITECTURES[target], sum(len(j.specs) for j in jobs), out)
    return Path(out)


def load_recipe(path: str) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """(model block, upcycle block or None) of a foundry YAML recipe, with ${...} variables resolved."""
    from foundry_upcycle.recipes import load_recipe as load_full_recipe
    cfg = load_full_recipe(str(Path(path).expanduser()))
    if not isinstance(cfg, dict) or not isinstance(cfg.get('model'), dict):
        raise ValueError(f'config: {path} has no `model:` block')
    return cfg['model'], cfg.get('upcycle')


def export_checkpoint(checkpoint: str, config: str, out: str, target: str = 'auto', tokenizer: Optional[str] = None,
                      overwrite: bool = False, dtype: Optional[torch.dtype] = None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
                      allow_inexact_engines: bool = False) -> Path:
    """Composer checkpoint (or state dict / safetensors) + YAML recipe -> HF directory, streamed: a torch file is
    memory-mapped (its optimizer state is never read), a safetensors file read tensor by tensor."""
    model_cfg, upcycle = load_recipe(config)
    resolved, arch = check_target(resolve_model_config(model_cfg, upcycle), target)
    engine_support(arch, resolved, allow_inexact_engines)  # fail before reading a large checkpoint
    return export_source(open_source(checkpoint), model_cfg, out, target, tokenizer, overwrite, dtype, upcycle,
                         max_shard_bytes, progress, allow_inexact_engines)


def mpt_config_dict(config: Any) -> dict[str, Any]:
    """The architecture keys of a live MPTConfig (drops PretrainedConfig's generation and bookkeeping fields)."""
    raw = config.to_dict()
    keep = set(MPT_DEFAULTS) | {'attn_config', 'ffn_config'}
    return {k: v for k, v in raw.items() if k in keep}
