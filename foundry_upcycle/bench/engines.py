"""Serving engines: vLLM (GPU, continuous batching; imported lazily) and Hugging Face `generate` (everywhere;
static batches, the CPU fallback).

vLLM: one `AsyncLLMEngine` per process (a dropped engine does not free its GPU memory, so the benchmark runs
each model in a process of its own, see `worker.py`), prefix caching off (the V1 engine caches by default and
would skip the prefill of repeated prompts), prompts passed as token ids, exactly `output_tokens` generated
(ignore_eos). Supported vLLM versions: SUPPORTED_VLLM (V1 engine, `AsyncLLMEngine` = `AsyncLLM`).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from foundry_upcycle.export.targets import VLLM_SUPPORTED

log = logging.getLogger(__name__)

ENGINES = ('auto', 'hf', 'vllm')
SUPPORTED_VLLM = VLLM_SUPPORTED  # [min, max)
# vLLM's token budget per scheduler step. Left unset, an engine built from AsyncEngineArgs (ENGINE_CONTEXT) gets
# 2048, which splits every 3500-token prompt of the paper workload over two prefill steps; `vllm serve` on an
# 80 GB+ GPU (H100) uses 8192. Set explicitly and recorded with the results.
MAX_NUM_BATCHED_TOKENS = 8192


@dataclass
class Timing:
    """perf_counter() seconds of one request's batch submission, first output token and completion."""

    start: float
    first: Optional[float]
    end: float


# ------------------------------------------------------------------------------------------------ HF

class _FirstTokenClock:
    """A `generate` streamer: the first put() is the prompt, the second the first new tokens."""

    def __init__(self):
        self.calls = 0
        self.first: Optional[float] = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def _pad_id(config: Any) -> int:
    for pad in (config.pad_token_id, config.eos_token_id, 0):
        if isinstance(pad, (list, tuple)):
            pad = pad[0] if pad else None
        if pad is not None:
            return int(pad)
    return 0


class HFEngine:
    """transformers `generate` on static batches: the CPU fallback, not continuous batching."""

    name = 'hf'

    def __init__(self, path: str, dtype, device):
        import torch
        from transformers import GenerationConfig

        from .models import load_hf
        self.model, self.device, self._torch, self._gen_config = load_hf(path, dtype, device), device, torch, \
            GenerationConfig

    def run_batch(self, prompts, output_tokens: int) -> list[Timing]:
        with self._torch.inference_mode():
            ids = prompts.to(self.device)  # [B, L]
            mc = self.model.config
            # min == max new tokens: every request produces exactly output_tokens, EOS or not.
            cfg = self._gen_config(max_new_tokens=output_tokens, min_new_tokens=output_tokens, do_sample=False,
                                   num_beams=1, use_cache=True, bos_token_id=mc.bos_token_id,
                                   eos_token_id=mc.eos_token_id, pad_token_id=_pad_id(mc))
            clock = _FirstTokenClock()
            start = time.perf_counter()
            out = self.model.generate(input_ids=ids, attention_mask=self._torch.ones_like(ids), generation_config=cfg,
                                      streamer=clock)
            end = time.perf_counter()
        produced = out.shape[1] - ids.shape[1]
        if produced != output_tokens:
            raise RuntimeError(f'generate produced {produced} tokens instead of {output_tokens}')
        return [Timing(start, clock.first, end) for _ in range(ids.shape[0])]

    def close(self):
        self.model = None


# ---------------------------------------------------------------------------------------------- vLLM

def check_vllm_version(version: str) -> None:
    from packaging.version import Version
    lo, hi = SUPPORTED_VLLM
    if not Version(lo) <= Version(version) < Version(hi):
        raise ValueError(f'vLLM {version} is not supported: this benchmark is written against vLLM >= {lo}, < {hi} '
                         '(V1 engine); install one of those in the serving environment')


def vllm_engine_args(path: str, dtype: str, max_num_seqs: int, max_model_len: int, seed: int,
                     max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS) -> dict[str, Any]:
    """The AsyncEngineArgs of one model. Top-k is in the directory's config.json (see models.with_top_k)."""
    return dict(model=path, skip_tokenizer_init=True, dtype=dtype, max_num_seqs=max_num_seqs,
                max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens, seed=seed,
                enable_prefix_caching=False, disable_log_stats=True,
                gpu_memory_utilization=float(os.environ.get('FOUNDRY_UPCYCLE_VLLM_GPU_UTIL', '0.9')))


class VLLMEngine:
    """vLLM's async engine in this process (only one per process; see module doc)."""

    name = 'vllm'
    _created = False

    def __init__(self, engine_args: dict[str, Any]):
        import vllm
        check_vllm_version(vllm.__version__)
        if VLLMEngine._created:
            raise RuntimeError('one vLLM engine per process: run each model in its own process (bench.worker)')
        VLLMEngine._created = True
        self._vllm, self.engine_args = vllm, dict(engine_args)
        self.engine = vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(**engine_args))

    def _params(self, output_tokens: int):
        return self._vllm.SamplingParams(max_tokens=output_tokens, min_tokens=output_tokens, ignore_eos=True,
                                         temperature=0.0, detokenize=False)

    async def stream(self, prompt: list[int], output_tokens: int, request_id: str) -> AsyncIterator[int]:
        """Yields the number of tokens generated so far, each time the engine returns more."""
        async for out in self.engine.generate({'prompt_token_ids': prompt}, self._params(output_tokens), request_id):
            yield len(out.outputs[0].token_ids)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def run_batch(self, prompts, output_tokens: int) -> list[Timing]:
        """A static batch through the async engine: all submitted at once, returns when all are done."""
        async def one(i: int, prompt: list[int], start: float) -> Timing:
            first, n = None, 0
            async for n in self.stream(prompt, output_tokens, f'batch-{start}-{i}'):
                first = first or time.perf_counter()
            if n != output_tokens:
                raise RuntimeError(f'vLLM produced {n} tokens instead of {output_tokens}')
            return Timing(start, first, time.perf_counter())

        async def all_of():
            start = time.perf_counter()
            return await asyncio.gather(*(one(i, p, start) for i, p in enumerate(prompts.tolist())))
        return list(run_async(all_of()))

    def close(self):
        self.engine.shutdown()


_LOOP: Optional[asyncio.AbstractEventLoop] = None


def run_async(coro):
    """Runs `coro` on this process's one event loop (the async engine's output handler lives on it)."""
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    return _LOOP.run_until_complete(coro)


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a CUDA/driver error raised at import
        return False
    import torch
    return torch.cuda.is_available()


def resolve_engine(requested: str, device) -> str:
    if requested == 'hf':
        return 'hf'
    if device.type == 'cuda' and vllm_available():
        return 'vllm'
    if requested == 'vllm':
        log.warning('engine vllm requested but vLLM is not importable with a GPU here; '
                    'falling back to Hugging Face generate (static batches, not continuous batching)')
    else:
        log.info('engine auto: vLLM unavailable (or no GPU), using Hugging Face generate')
    return 'hf'


def resolve_device(requested: str):
    import torch
    if requested == 'cuda' and not torch.cuda.is_available():
        raise ValueError('device cuda requested but torch sees no CUDA device')
    if requested == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(requested)


def resolve_dtype(requested: str, device) -> str:
    """'auto' -> bfloat16 on GPU, float32 on CPU; else the canonical name of `requested`."""
    from foundry_upcycle.export.targets import DTYPE_NAMES
    if requested == 'auto':
        return 'bfloat16' if device.type == 'cuda' else 'float32'
    return DTYPE_NAMES[requested]
