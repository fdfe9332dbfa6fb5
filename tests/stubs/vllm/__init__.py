"""A stand-in for vLLM in tests (CPU): the API surface the benchmark uses, recording what it is given.

Every engine created and every request received is appended as a JSON line to $VLLM_STUB_LOG, with the
process id, so tests can check the engine arguments (prefix caching, top-k in the model's config.json), one
engine per process, and that no prompt is sent twice. Generation simulates continuous batching: up to
max_num_seqs requests run at once, each token takes $VLLM_STUB_STEP_S seconds.
"""
import asyncio
import json
import os
from pathlib import Path

__version__ = os.environ.get('VLLM_STUB_VERSION', '0.11.0')


def _log(event: dict) -> None:
    path = os.environ.get('VLLM_STUB_LOG')
    if path:
        with open(path, 'a') as f:
            f.write(json.dumps({'pid': os.getpid(), **event}) + '\n')


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class AsyncEngineArgs:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class _Completion:
    def __init__(self, token_ids):
        self.token_ids = token_ids


class _RequestOutput:
    def __init__(self, token_ids):
        self.outputs = [_Completion(token_ids)]


class AsyncLLMEngine:
    @classmethod
    def from_engine_args(cls, args: AsyncEngineArgs) -> 'AsyncLLMEngine':
        return cls(args.kwargs)

    def __init__(self, kwargs):
        cfg = json.loads((Path(kwargs['model']) / 'config.json').read_text())
        top_k = cfg.get('num_experts_per_tok') or (cfg.get('ffn_config') or {}).get('moe_top_k')
        _log({'event': 'engine', 'kwargs': kwargs, 'top_k': top_k, 'model_type': cfg.get('model_type')})
        self.max_num_seqs = kwargs['max_num_seqs']
        self.step = float(os.environ.get('VLLM_STUB_STEP_S', '0.002'))
        self.running = 0
        self.aborted = set()

    async def generate(self, prompt, params, request_id):
        ids = list(prompt['prompt_token_ids'])
        _log({'event': 'request', 'id': request_id, 'head': ids[:16], 'prompt': hash(tuple(ids)), 'len': len(ids),
              'max_tokens': params.max_tokens, 'ignore_eos': params.ignore_eos})
        while self.running >= self.max_num_seqs:
            await asyncio.sleep(self.step)
        self.running += 1
        try:
            await asyncio.sleep(2 * self.step)  # prefill
            for n in range(1, params.max_tokens + 1):
                if request_id in self.aborted:
                    return
                yield _RequestOutput(list(range(n)))
                await asyncio.sleep(self.step)
        finally:
            self.running -= 1

    async def abort(self, request_id):
        self.aborted.add(request_id)

    def shutdown(self):
        _log({'event': 'shutdown'})
