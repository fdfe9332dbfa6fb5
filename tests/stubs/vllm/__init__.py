"""A stand-in for vLLM in tests (CPU): the API surface the benchmark uses, as strict as the real one.

Like vLLM (read from its 0.12 source): `SamplingParams` (a msgspec Struct) and `AsyncEngineArgs` (a dataclass) raise
TypeError on an unknown keyword; a prompt longer than `max_model_len` raises ValueError; generation stops at
`max_tokens` or when prompt + output reach `max_model_len`; `generate` yields cumulative outputs, and one output
may carry several new tokens ($VLLM_STUB_TOKENS_PER_UPDATE, default 2: the async engine batches what a step
produced); `__version__` is $VLLM_STUB_VERSION (default 0.12.0), so version rules can be tested either side of a
change. Every engine created and every request received is appended as a JSON line to $VLLM_STUB_LOG, with the
process id. Up to max_num_seqs requests run at once; each token takes $VLLM_STUB_STEP_S seconds.
"""
import asyncio
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

__version__ = os.environ.get('VLLM_STUB_VERSION', '0.12.0')


def _log(event: dict) -> None:
    path = os.environ.get('VLLM_STUB_LOG')
    if path:
        with open(path, 'a') as f:
            f.write(json.dumps({'pid': os.getpid(), **event}) + '\n')


@dataclasses.dataclass
class SamplingParams:  # the fields of vLLM's SamplingParams the benchmark could plausibly pass (0.10 - 0.12)
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: Optional[Any] = None
    stop_token_ids: Optional[list] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    detokenize: bool = True
    skip_special_tokens: bool = True


@dataclasses.dataclass
class AsyncEngineArgs:  # the EngineArgs fields the benchmark could plausibly pass (0.10 - 0.12)
    model: str = 'facebook/opt-125m'
    tokenizer: Optional[str] = None
    skip_tokenizer_init: bool = False
    dtype: str = 'auto'
    seed: Optional[int] = 0
    max_model_len: Optional[int] = None
    max_num_seqs: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None
    enable_prefix_caching: Optional[bool] = None
    enable_chunked_prefill: Optional[bool] = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    disable_log_stats: bool = False
    enforce_eager: bool = False


class _Completion:
    def __init__(self, token_ids):
        self.token_ids = token_ids


class _RequestOutput:
    def __init__(self, request_id, token_ids, finished):
        self.request_id, self.outputs, self.finished = request_id, [_Completion(token_ids)], finished


class AsyncLLMEngine:
    @classmethod
    def from_engine_args(cls, args: AsyncEngineArgs) -> 'AsyncLLMEngine':
        if not isinstance(args, AsyncEngineArgs):
            raise TypeError(f'expected AsyncEngineArgs, got {type(args).__name__}')
        return cls(args)

    def __init__(self, args: AsyncEngineArgs):
        cfg = json.loads((Path(args.model) / 'config.json').read_text())
        top_k = cfg.get('num_experts_per_tok') or (cfg.get('ffn_config') or {}).get('moe_top_k')
        kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
        _log({'event': 'engine', 'kwargs': kwargs, 'top_k': top_k, 'model_type': cfg.get('model_type'),
              'version': __version__})
        self.max_num_seqs = args.max_num_seqs or 256
        self.max_model_len = args.max_model_len or cfg.get('max_position_embeddings', 2048)
        self.step = float(os.environ.get('VLLM_STUB_STEP_S', '0.002'))
        self.per_update = int(os.environ.get('VLLM_STUB_TOKENS_PER_UPDATE', '2'))
        self.running = 0
        self.aborted = set()

    async def generate(self, prompt, params: SamplingParams, request_id):
        if not isinstance(params, SamplingParams):
            raise TypeError(f'expected SamplingParams, got {type(params).__name__}')
        ids = list(prompt['prompt_token_ids'])
        if len(ids) > self.max_model_len:
            raise ValueError(f'The decoder prompt (length {len(ids)}) is longer than the maximum model length of '
                             f'{self.max_model_len}.')
        limit = min(params.max_tokens, self.max_model_len - len(ids))
        _log({'event': 'request', 'id': request_id, 'head': ids[:16], 'prompt': hash(tuple(ids)), 'len': len(ids),
              'max_tokens': params.max_tokens, 'ignore_eos': params.ignore_eos})
        while self.running >= self.max_num_seqs:
            await asyncio.sleep(self.step)
        self.running += 1
        try:
            await asyncio.sleep(2 * self.step)  # prefill: the first token
            n = 1
            while True:
                if request_id in self.aborted:
                    return
                yield _RequestOutput(request_id, list(range(n)), n >= limit)
                if n >= limit:
                    return
                new = min(self.per_update, limit - n)
                await asyncio.sleep(new * self.step)
                n += new
        finally:
            self.running -= 1

    async def abort(self, request_id):
        self.aborted.add(request_id)

    def shutdown(self):
        _log({'event': 'shutdown'})
