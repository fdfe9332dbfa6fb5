"""Latency vs throughput of a dense model and its upcycled MoE at top-1 and top-2 (the paper's Figures 2 and 3).

Two modes share one engine interface, `run_batch(prompts [B, L], output_tokens) -> B timings`:
- offline: requests in static batches of each batch size; a batch is submitted when the previous one ends and
  latency counts from its submission. Every batch is full (prompts are reused cyclically).
- online: Poisson arrivals at a request rate; whenever the engine is idle, a scheduler takes up to
  `max_batch_size` waiting requests as one batch. Latency and time to first token count from arrival, so they
  include queueing. Bounded by `online_max_seconds` (nothing is admitted after it; the batch in flight finishes)
  and by the request count.
Engines: Hugging Face `generate` (everywhere) and vLLM (GPU; imported lazily). Models: HF directories, or
synthetic Llama / Mixtral models with random weights built from a shape spec, where the MoE is the dense model
upcycled (every expert a copy of the dense MLP, random router), so both compute the same function.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import logging
import math
import os
import platform
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from .outputs import dump_json, write_atomically

log = logging.getLogger(__name__)

SCHEMA = 1
PAPER_WORKLOAD = (3500, 300)  # input, output tokens (paper, vLLM on H100)
CPU_WORKLOAD = (64, 16)
ENGINES = ('auto', 'hf', 'vllm')
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
AUTO_RATE_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.5)  # of the first model's best offline requests/s

# Max throughput (tokens/s) from the paper (vLLM 0.6.2, H100, 3500 in / 300 out); see REFERENCE.md.
# (dense name, dense tokens/s, MoE name, MoE top-1 tokens/s, MoE top-2 tokens/s)
PAPER_MAX_THROUGHPUT = (
    ('436M', 58140, '1.6B', 33820, 31920),
    ('1.4B', 46740, '6.7B', 31540, 25840),
    ('8B (4 GPUs, TP)', 32680, '47B', 19380, 16720),
)


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


@dataclass(frozen=True)
class ModelShape:
    """A Llama-like dense model (RMSNorm, rope, GQA, SiLU-GLU, untied embeddings) and its E-expert MoE."""

    d_model: int
    n_layers: int
    ffn_hidden: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    num_experts: int = 8

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if not _positive_int(getattr(self, f.name)):
                raise ValueError(f'shape.{f.name} must be a positive integer, got {getattr(self, f.name)!r}')
        if self.d_model % self.n_heads:
            raise ValueError(f'shape.n_heads={self.n_heads} must divide d_model={self.d_model}')
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f'shape.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}')
        if self.num_experts < 2:
            raise ValueError(f'shape.num_experts must be >= 2, got {self.num_experts}')

    def params(self, moe: bool = False) -> int:
        """Parameter count of the dense model, or of its MoE (all experts, routers included)."""
        d, f, hd = self.d_model, self.ffn_hidden, self.d_model // self.n_heads
        attn = 2 * d * d + 2 * d * self.n_kv_heads * hd
        mlp = 3 * d * f
        ffn = self.num_experts * mlp + self.num_experts * d if moe else mlp
        return self.n_layers * (attn + ffn + 2 * d) + 2 * self.vocab_size * d + d


# Paper shapes (REFERENCE.md): 16 heads / 4 KV heads, GPT-4 tokenizer (padded vocab), 8 experts.
SHAPES = {
    'tiny': ModelShape(d_model=64, n_layers=2, ffn_hidden=160, n_heads=4, n_kv_heads=2, vocab_size=256),
    '436m': ModelShape(d_model=1024, n_layers=22, ffn_hidden=2560, n_heads=16, n_kv_heads=4, vocab_size=100352),
    '1.4b': ModelShape(d_model=2048, n_layers=24, ffn_hidden=5120, n_heads=16, n_kv_heads=4, vocab_size=100352),
}


@dataclass(frozen=True)
class Workload:
    input_tokens: int = CPU_WORKLOAD[0]
    output_tokens: int = CPU_WORKLOAD[1]
    num_requests: int = 16
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    rates: Union[tuple[float, ...], str] = ()  # requests/s, or 'auto' (fractions of the first model's best)
    max_batch_size: Optional[int] = None  # online scheduler; default max(batch_sizes)
    online_max_seconds: float = 30.0
    repeats: int = 1  # each setting runs this often; the run with the median throughput is reported
    seed: int = 0

    def __post_init__(self):
        for key in ('input_tokens', 'output_tokens', 'num_requests', 'repeats'):
            if not _positive_int(getattr(self, key)):
                raise ValueError(f'workload.{key} must be a positive integer, got {getattr(self, key)!r}')
        if not all(_positive_int(b) for b in self.batch_sizes):
            raise ValueError(f'workload.batch_sizes must be positive integers, got {self.batch_sizes!r}')
        if self.rates != 'auto':
            if isinstance(self.rates, str) or not all(isinstance(r, (int, float)) and r > 0 for r in self.rates):
                raise ValueError(f"workload.rates must be positive numbers or 'auto', got {self.rates!r}")
        elif not self.batch_sizes:
            raise ValueError("workload.rates 'auto' derives rates from the offline runs: give batch_sizes too")
        if not self.batch_sizes and not self.rates:
            raise ValueError('workload: give batch_sizes (offline mode), rates (online mode) or both')
        if self.max_batch_size is not None and not _positive_int(self.max_batch_size):
            raise ValueError(f'workload.max_batch_size must be a positive integer, got {self.max_batch_size!r}')
        if not self.online_max_seconds > 0:
            raise ValueError(f'workload.online_max_seconds must be > 0, got {self.online_max_seconds!r}')

    @property
    def scheduler_batch(self) -> int:
        return self.max_batch_size or max(self.batch_sizes, default=8)


@dataclass(frozen=True)
class BenchConfig:
    workload: Workload = Workload()
    shape: ModelShape = SHAPES['tiny']
    dense_path: Optional[str] = None  # HF directory; with moe_path None too, synthetic models from `shape`
    moe_path: Optional[str] = None
    top_ks: tuple[int, ...] = (1, 2)
    engine: str = 'auto'
    device: str = 'auto'
    dtype: str = 'auto'
    threads: Optional[int] = None
    router_init_std: float = 0.02
    progress: bool = True

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f'engine must be one of {ENGINES}, got {self.engine!r}')
        if self.device not in ('auto', 'cpu', 'cuda'):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.dtype != 'auto' and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not self.top_ks or not all(_positive_int(k) for k in self.top_ks):
            raise ValueError(f'top_ks must be positive integers, got {self.top_ks!r}')
        if self.synthetic and max(self.top_ks) > self.shape.num_experts:
            raise ValueError(f'top_ks {self.top_ks} exceed shape.num_experts={self.shape.num_experts}')
        if self.threads is not None and not _positive_int(self.threads):
            raise ValueError(f'threads must be a positive integer, got {self.threads!r}')
        for key in ('dense_path', 'moe_path'):
            path = getattr(self, key)
            if path is not None and not (Path(path) / 'config.json').is_file():
                raise ValueError(f'{key}: {path} is not a Hugging Face model directory (no config.json)')

    @property
    def synthetic(self) -> bool:
        return self.dense_path is None and self.moe_path is None


# ---------------------------------------------------------------------------------------------- models

def _transformers():
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
    import transformers
    return transformers


def _common_config(shape: ModelShape, max_len: int) -> dict[str, Any]:
    return dict(
        vocab_size=shape.vocab_size, hidden_size=shape.d_model, intermediate_size=shape.ffn_hidden,
        num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads, max_position_embeddings=max_len, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, hidden_act='silu', pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )


def synthetic_dense(shape: ModelShape, max_len: int, seed: int) -> torch.nn.Module:
    """A LlamaForCausalLM with random weights (HF init, std 0.02), fp32 on CPU."""
    tf = _transformers()
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(**_common_config(shape, max_len), attn_implementation='sdpa')
    return tf.LlamaForCausalLM(cfg).eval()


_MLP_KEY = re.compile(r'model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight')
_MIXTRAL_W = {'gate': 'w1', 'up': 'w3', 'down': 'w2'}


def upcycle_to_mixtral(dense: torch.nn.Module, num_experts: int, top_k: int, router_init_std: float,
                       seed: int) -> torch.nn.Module:
    """The MixtralForCausalLM whose E experts copy `dense`'s MLPs (random router): same function as `dense`."""
    tf = _transformers()
    dcfg = dense.config
    shape = ModelShape(dcfg.hidden_size, dcfg.num_hidden_layers, dcfg.intermediate_size,
                       dcfg.num_attention_heads, dcfg.num_key_value_heads, dcfg.vocab_size, num_experts)
    cfg = tf.MixtralConfig(**_common_config(shape, dcfg.max_position_embeddings), num_local_experts=num_experts,
                           num_experts_per_tok=top_k, router_jitter_noise=0.0, sliding_window=None,
                           router_aux_loss_coef=0.01, attn_implementation='sdpa')
    with torch.device('meta'):
        moe = tf.MixtralForCausalLM(cfg)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in dense.state_dict().items():
        m = _MLP_KEY.fullmatch(key)
        if m is None:
            state[key] = tensor
            continue
        layer, w = m.group(1), _MIXTRAL_W[m.group(2)]
        for e in range(num_experts):
            state[f'model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight'] = tensor.clone()
    gen = torch.Generator().manual_seed(seed)
    for i in range(dcfg.num_hidden_layers):
        router = torch.randn(num_experts, dcfg.hidden_size, generator=gen) * router_init_std
        state[f'model.layers.{i}.block_sparse_moe.gate.weight'] = router.to(dense.dtype)
    missing, unexpected = moe.load_state_dict(state, strict=False, assign=True)
    # Rotary inv_freq is a non-persistent buffer: recompute it off the meta device.
    leftover = [k for k in missing if 'rotary_emb' not in k]
    if leftover or unexpected:
        raise RuntimeError(f'upcycle_to_mixtral: missing {leftover}, unexpected {unexpected}')
    moe.model.rotary_emb = type(moe.model.rotary_emb)(config=cfg)
    return moe.eval()


def set_top_k(model: torch.nn.Module, top_k: int) -> None:
    """Switches a Mixtral or DBRX model to route each token to `top_k` experts, in place."""
    name = type(model).__name__
    if hasattr(model.config, 'num_experts_per_tok') and 'Mixtral' in name:
        if top_k > model.config.num_local_experts:
            raise ValueError(f'top_k={top_k} exceeds the model\'s {model.config.num_local_experts} experts')
        model.config.num_experts_per_tok = top_k
        for layer in model.model.layers:
            layer.block_sparse_moe.top_k = top_k
        return
    if 'Dbrx' in name:
        if top_k > model.config.ffn_config.moe_num_experts:
            raise ValueError(f'top_k={top_k} exceeds the model\'s {model.config.ffn_config.moe_num_experts} experts')
        model.config.ffn_config.moe_top_k = top_k
        for block in model.transformer.blocks:
            block.ffn.router.moe_top_k = top_k
        return
    raise ValueError(f'cannot set top_k on {name}: the MoE model must be Mixtral or DBRX')


def num_experts_of(config: Any) -> Optional[int]:
    if getattr(config, 'num_local_experts', None):
        return int(config.num_local_experts)
    ffn = getattr(config, 'ffn_config', None)
    return int(ffn.moe_num_experts) if getattr(ffn, 'moe_num_experts', None) else None


def param_counts(model: torch.nn.Module, top_k: Optional[int]) -> tuple[int, int]:
    """(total, active per token) parameters; experts count K/E towards the active ones."""
    total = sum(p.numel() for p in model.parameters())
    num_experts = num_experts_of(model.config)
    if not num_experts or not top_k:
        return total, total
    expert = sum(p.numel() for n, p in model.named_parameters() if '.experts.' in n)
    return total, total - round(expert * (1 - top_k / num_experts))


def load_hf(path: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    tf = _transformers()
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f'{path}: cannot load as a Hugging Face causal LM ({e})') from None
    return model.to(device).eval()


def meta_model(path: str) -> torch.nn.Module:
    """A weightless model from `path`'s config, for parameter counts when vLLM holds the weights."""
    tf = _transformers()
    cfg = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device('meta'):
        return tf.AutoModelForCausalLM.from_config(cfg)


# --------------------------------------------------------------------------------------------- engines

@dataclass
class Timing:
    """perf_counter() seconds of one request's batch submission, first output token and completion."""

    start: float
    first: Optional[float]
    end: float


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
    name = 'hf'

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        tf = _transformers()
        self._gen_config = tf.GenerationConfig  # built per call: lengths vary

    @torch.inference_mode()
    def run_batch(self, prompts: torch.Tensor, output_tokens: int) -> list[Timing]:
        ids = prompts.to(self.device)  # [B, L]
        mc = self.model.config
        # min == max new tokens: every request produces exactly output_tokens, EOS or not.
        cfg = self._gen_config(max_new_tokens=output_tokens, min_new_tokens=output_tokens, do_sample=False,
                               num_beams=1, use_cache=True, bos_token_id=mc.bos_token_id,
                               eos_token_id=mc.eos_token_id, pad_token_id=_pad_id(mc))
        clock = _FirstTokenClock()
        start = time.perf_counter()
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg,
                                  streamer=clock)
        end = time.perf_counter()  # out.cpu() below is outside the timed region; the streamer synced already
        produced = out.shape[1] - ids.shape[1]
        if produced != output_tokens:
            raise RuntimeError(f'generate produced {produced} tokens instead of {output_tokens}')
        return [Timing(start, clock.first, end) for _ in range(ids.shape[0])]

    def close(self):
        self.model = None


class VLLMEngine:
    """vLLM offline `LLM` fed the same static batches as the HF engine (GPU only; imported lazily)."""

    name = 'vllm'

    def __init__(self, path: str, top_k: Optional[int], dtype: torch.dtype, max_batch: int, max_len: int,
                 seed: int):
        import vllm
        kwargs: dict[str, Any] = dict(model=path, skip_tokenizer_init=True, dtype=str(dtype).removeprefix('torch.'),
                                      max_num_seqs=max_batch, max_model_len=max_len, seed=seed)
        if top_k is not None:
            kwargs['hf_overrides'] = {'num_experts_per_tok': top_k}
        self._vllm = vllm
        self.llm = vllm.LLM(**kwargs)

    def run_batch(self, prompts: torch.Tensor, output_tokens: int) -> list[Timing]:
        params = self._vllm.SamplingParams(max_tokens=output_tokens, min_tokens=output_tokens, ignore_eos=True,
                                           temperature=0.0, detokenize=False)
        inputs = [{'prompt_token_ids': p.tolist()} for p in prompts]
        wall0, start = time.time(), time.perf_counter()
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        end = time.perf_counter()
        timings = []
        for o in outs:
            if len(o.outputs[0].token_ids) != output_tokens:
                raise RuntimeError(f'vLLM produced {len(o.outputs[0].token_ids)} tokens instead of {output_tokens}')
            metrics = getattr(o, 'metrics', None)  # per-request times (wall clock) where this vLLM records them
            first = getattr(metrics, 'first_token_time', None)
            timings.append(Timing(start, start + (first - wall0) if first else None, end))
        return timings

    def close(self):
        self.llm = None
        gc.collect()
        torch.cuda.empty_cache()


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a CUDA/driver error raised at import
        return False
    return torch.cuda.is_available()


def resolve_engine(requested: str, device: torch.device) -> str:
    if requested == 'hf':
        return 'hf'
    if device.type == 'cuda' and vllm_available():
        return 'vllm'
    if requested == 'vllm':
        log.warning('engine vllm requested but vLLM is not importable with a GPU here; '
                    'falling back to Hugging Face generate')
    else:
        log.info('engine auto: vLLM unavailable (or no GPU), using Hugging Face generate')
    return 'hf'


def resolve_device(requested: str) -> torch.device:
    if requested == 'cuda' and not torch.cuda.is_available():
        raise ValueError('device cuda requested but torch sees no CUDA device')
    if requested == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(requested)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == 'auto':
        return torch.bfloat16 if device.type == 'cuda' else torch.float32
    return DTYPES[requested]


# ----------------------------------------------------------------------------------------------- modes

def make_prompts(vocab_size: int, wl: Workload) -> torch.Tensor:
    """[num_requests, input_tokens] random token ids (ids 0-2 are left out: pad/bos/eos)."""
    gen = torch.Generator().manual_seed(wl.seed)
    return torch.randint(3, max(vocab_size, 4), (wl.num_requests, wl.input_tokens), generator=gen)


def _pct(values: Sequence[float], q: float) -> Optional[float]:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(requests: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Aggregates per-request records ({ttft_s, latency_s, input_tokens, output_tokens}) over `wall_s`."""
    lat = [r['latency_s'] for r in requests]
    ttft = [r['ttft_s'] for r in requests if r['ttft_s'] is not None]
    out_tok = sum(r['output_tokens'] for r in requests)
    in_tok = sum(r['input_tokens'] for r in requests)
    ok = wall_s > 0 and requests
    return {
        'num_served': len(requests), 'wall_s': wall_s,
        'output_tokens_per_s': out_tok / wall_s if ok else 0.0,
        'total_tokens_per_s': (in_tok + out_tok) / wall_s if ok else 0.0,
        'requests_per_s': len(requests) / wall_s if ok else 0.0,
        'latency_p50_s': _pct(lat, 50), 'latency_p90_s': _pct(lat, 90),
        'latency_mean_s': float(np.mean(lat)) if lat else None,
        'ttft_p50_s': _pct(ttft, 50), 'ttft_p90_s': _pct(ttft, 90),
        'request_output_tokens_per_s_p50': _pct([r['output_tokens_per_s'] for r in requests], 50),
    }


def _records(timings: list[Timing], arrivals: Sequence[float], t0: float, wl: Workload) -> list[dict[str, Any]]:
    out = []
    for t, arrival in zip(timings, arrivals):
        latency = t.end - arrival
        out.append({
            'arrival_s': arrival - t0, 'ttft_s': None if t.first is None else t.first - arrival,
            'latency_s': latency, 'input_tokens': wl.input_tokens, 'output_tokens': wl.output_tokens,
            'output_tokens_per_s': wl.output_tokens / latency,
        })
    return out


def run_offline(engine, prompts: torch.Tensor, batch_size: int, wl: Workload, bar=None) -> dict[str, Any]:
    """ceil(num_requests / batch_size) full batches back to back; latency counts from each batch's submission."""
    n_batches = math.ceil(len(prompts) / batch_size)
    order = torch.arange(n_batches * batch_size) % len(prompts)
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for b in range(n_batches):
        timings = engine.run_batch(prompts[order[b * batch_size:(b + 1) * batch_size]], wl.output_tokens)
        records += _records(timings, [t.start for t in timings], t0, wl)
        if bar is not None:
            bar.update(1)
    wall = time.perf_counter() - t0
    return {'batch_size': batch_size, 'num_requests': len(records), **summarize(records, wall), 'requests': records}


def poisson_arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    """Arrival offsets (s) of n requests at `rate` requests/s; the first arrives at 0."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


def run_online(engine, prompts: torch.Tensor, rate: float, wl: Workload, bar=None) -> dict[str, Any]:
    """Poisson arrivals; the idle engine takes up to `scheduler_batch` waiting requests as one batch."""
    arrivals = poisson_arrivals(len(prompts), rate, wl.seed)
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    deadline = t0 + wl.online_max_seconds
    nxt = 0
    while nxt < len(prompts):
        now = time.perf_counter()
        if now >= deadline:
            break
        waiting = int(np.searchsorted(arrivals, now - t0, side='right')) - nxt
        if waiting <= 0:
            time.sleep(max(0.0, min(t0 + arrivals[nxt], deadline) - now))
            continue
        batch = list(range(nxt, nxt + min(waiting, wl.scheduler_batch)))
        timings = engine.run_batch(prompts[batch], wl.output_tokens)
        records += _records(timings, [t0 + arrivals[i] for i in batch], t0, wl)
        nxt = batch[-1] + 1
        if bar is not None:
            bar.update(len(batch))
    wall = (max(r['arrival_s'] + r['latency_s'] for r in records) if records else time.perf_counter() - t0)
    return {
        'rate': rate, 'num_requests': len(prompts), 'num_dropped': len(prompts) - len(records),
        'truncated': len(records) < len(prompts), 'max_batch_size': wl.scheduler_batch,
        'elapsed_s': time.perf_counter() - t0, **summarize(records, wall), 'requests': records,
    }


def auto_rates(first_model: dict[str, Any]) -> tuple[float, ...]:
    best = max(r['requests_per_s'] for r in first_model['offline'])
    return tuple(float(f'{f * best:.3g}') for f in AUTO_RATE_FRACTIONS)


# ------------------------------------------------------------------------------------------- benchmark

def _max_len(wl: Workload) -> int:
    return wl.input_tokens + wl.output_tokens


def check_memory(cfg: BenchConfig, dtype: torch.dtype, device: torch.device) -> None:
    """Refuses synthetic shapes that cannot fit: dense + MoE weights (both live while upcycling) + KV cache."""
    s, wl = cfg.shape, cfg.workload
    width = torch.finfo(dtype).bits // 8
    batch = max(wl.batch_sizes + (wl.scheduler_batch,))
    kv = 2 * s.n_layers * s.n_kv_heads * (s.d_model // s.n_heads) * _max_len(wl) * batch * width
    need = (s.params() + s.params(moe=True)) * width + kv
    if device.type == 'cuda':
        avail = torch.cuda.mem_get_info()[0]
    else:
        try:
            import psutil
            avail = psutil.virtual_memory().available
        except ImportError:
            return
    if need > 0.9 * avail:
        raise ValueError(
            f'shape {s} with {_max_len(wl)} tokens x batch {batch} needs about {need / 2**30:.1f} GiB on '
            f'{device.type}, '
            f'{avail / 2**30:.1f} GiB available: use --dtype bfloat16, a smaller --shape, or smaller '
            '--batch-sizes / --input-tokens',
        )


def _info(name: str, kind: str, top_k: Optional[int], source: str, model: torch.nn.Module) -> dict[str, Any]:
    total, active = param_counts(model, top_k)
    emb = model.get_input_embeddings().weight.numel()
    return {
        'name': name, 'kind': kind, 'top_k': top_k, 'num_experts': num_experts_of(model.config),
        'source': source, 'architecture': type(model).__name__, 'total_params': total, 'active_params': active,
        # forward FLOPs per token, matmuls only (no attention over the context): 2 x active non-embedding params
        'forward_flops_per_token': 2 * (active - emb),
    }


def _models(cfg: BenchConfig, device: torch.device, dtype: torch.dtype,
            weights: bool = True) -> Iterator[tuple[dict, torch.nn.Module]]:
    """(info, model) in benchmark order; the previous model is released before the next is built.

    weights=False: HF directories are read as weightless (meta) models, for engines that load them themselves.
    """
    def load(path: str) -> torch.nn.Module:
        return load_hf(path, dtype, device) if weights else meta_model(path)

    if cfg.synthetic:
        source = f'synthetic:{_shape_name(cfg.shape)}'
        dense = synthetic_dense(cfg.shape, _max_len(cfg.workload), cfg.workload.seed).to(dtype)
        yield _info('dense', 'dense', None, source, dense), dense.to(device)
        moe = upcycle_to_mixtral(dense.cpu(), cfg.shape.num_experts, cfg.top_ks[0], cfg.router_init_std,
                                 cfg.workload.seed)
        del dense
        gc.collect()
        moe = moe.to(device)
        for k in cfg.top_ks:
            set_top_k(moe, k)
            yield _info(f'moe-top{k}', 'moe', k, source, moe), moe
        return
    if cfg.dense_path:
        dense = load(cfg.dense_path)
        yield _info('dense', 'dense', None, cfg.dense_path, dense), dense
        del dense
        gc.collect()
    if cfg.moe_path:
        moe = load(cfg.moe_path)
        if num_experts_of(moe.config) is None:
            raise ValueError(f'moe_path: {cfg.moe_path} holds a {type(moe).__name__}, not a mixture of experts')
        for k in cfg.top_ks:
            set_top_k(moe, k)
            yield _info(f'moe-top{k}', 'moe', k, cfg.moe_path, moe), moe


def _shape_name(shape: ModelShape) -> str:
    return next((n for n, s in SHAPES.items() if s == shape), 'custom')


def _engine_for(engine_name: str, info: dict, model: torch.nn.Module, cfg: BenchConfig, device: torch.device,
                dtype: torch.dtype, tmp: Path, saved: dict[int, str]):
    if engine_name == 'hf':
        return HFEngine(model, device)
    path = {'dense': cfg.dense_path, 'moe': cfg.moe_path}[info['kind']]
    if path is None:  # synthetic: vLLM loads from disk
        if id(model) not in saved:
            saved[id(model)] = str(tmp / info['kind'])
            model.save_pretrained(saved[id(model)], safe_serialization=True)
        path = saved[id(model)]
    return VLLMEngine(path, info['top_k'], dtype, cfg.workload.scheduler_batch, _max_len(cfg.workload),
                      cfg.workload.seed)


def environment(device: torch.device, engine: str, requested: str, dtype: torch.dtype) -> dict[str, Any]:
    tf = _transformers()
    env = {
        'device': device.type, 'device_name': _device_name(device), 'torch': torch.__version__,
        'transformers': tf.__version__, 'python': platform.python_version(), 'platform': platform.platform(),
        'threads': torch.get_num_threads(), 'cpu_count': os.cpu_count(), 'engine': engine,
        'engine_requested': requested, 'dtype': str(dtype).removeprefix('torch.'),
    }
    if engine == 'vllm':
        import vllm
        env['vllm'] = vllm.__version__
    return env


def _device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'cpu'


def _bench_model(engine, info: dict, prompts: torch.Tensor, wl: Workload, rates: Optional[Sequence[float]],
                 progress: bool) -> dict[str, Any]:
    """Warm-up (excluded), then the offline batch sizes, then the online rates (None: derived, see auto_rates)."""
    from tqdm.auto import tqdm
    warm = prompts[:min(wl.batch_sizes + (wl.scheduler_batch,))]
    engine.run_batch(warm, wl.output_tokens)
    n_batches = sum(math.ceil(len(prompts) / b) for b in wl.batch_sizes)
    n_rates = len(AUTO_RATE_FRACTIONS) if rates is None else len(rates)
    with tqdm(total=wl.repeats * (n_batches + n_rates * len(prompts)), desc=info['name'], unit='step',
              disable=not progress) as bar:
        info = {**info, 'offline': [_median_of(wl.repeats, lambda: run_offline(engine, prompts, b, wl, bar))
                                    for b in wl.batch_sizes]}
        if rates is None:
            rates = auto_rates(info)
            log.info('auto request rates (req/s): %s', ', '.join(f'{r:g}' for r in rates))
        info['online'] = [_median_of(wl.repeats, lambda: run_online(engine, prompts, rate, wl, bar))
                          for rate in rates]
    return {**info, **max_throughput(info)}


def _median_of(repeats: int, run) -> dict[str, Any]:
    """The run with the median output throughput of `repeats` runs, plus every run's aggregates."""
    runs = sorted((run() for _ in range(repeats)), key=lambda r: r['output_tokens_per_s'])
    keep = runs[(len(runs) - 1) // 2]
    return {**keep, 'repeats': [{k: v for k, v in r.items() if k != 'requests'} for r in runs]}


def max_throughput(model: dict[str, Any]) -> dict[str, Any]:
    runs = [(r, f'batch {r["batch_size"]}') for r in model['offline']]
    runs += [(r, f'{r["rate"]:g} req/s') for r in model['online']]
    best, at = max(runs, key=lambda ra: ra[0]['output_tokens_per_s'])
    return {'max_output_tokens_per_s': best['output_tokens_per_s'],
            'max_total_tokens_per_s': max(r['total_tokens_per_s'] for r, _ in runs), 'max_at': at}


def summary_rows(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    dense = next((m for m in models if m['kind'] == 'dense'), None)
    rows = []
    for m in models:
        row = {k: m[k] for k in ('name', 'kind', 'top_k', 'total_params', 'active_params',
                                 'max_output_tokens_per_s', 'max_total_tokens_per_s', 'max_at')}
        for metric in ('output', 'total'):
            key = f'max_{metric}_tokens_per_s'
            row[f'{metric}_change_vs_dense_pct'] = (100.0 * (m[key] / dense[key] - 1.0)
                                                    if dense and dense[key] > 0 else None)
        rows.append(row)
    return rows


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Runs every model through the offline and online modes; returns the inference.json content."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_benchmark(cfg)
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    engine_name = resolve_engine(cfg.engine, device)
    wl = cfg.workload
    if cfg.synthetic:
        check_memory(cfg, dtype, device)
    rates: Optional[tuple[float, ...]] = None if wl.rates == 'auto' else tuple(wl.rates)
    models: list[dict[str, Any]] = []
    saved: dict[int, str] = {}
    build_device = torch.device('cpu') if engine_name == 'vllm' else device
    with tempfile.TemporaryDirectory(prefix='bench-models-') as tmp:
        for info, model in _models(cfg, build_device, dtype, weights=engine_name == 'hf'):
            engine = _engine_for(engine_name, info, model, cfg, device, dtype, Path(tmp), saved)
            prompts = make_prompts(model.config.vocab_size, wl)
            try:
                models.append(_bench_model(engine, info, prompts, wl, rates, cfg.progress))
            finally:
                engine.close()
            rates = tuple(r['rate'] for r in models[0]['online'])  # 'auto': every model gets the first's rates
    return {
        'schema': SCHEMA,
        'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'environment': environment(device, engine_name, cfg.engine, dtype),
        'workload': {**dataclasses.asdict(wl), 'rates': list(rates or ()), 'rates_requested': wl.rates,
                     'scheduler_batch': wl.scheduler_batch},
        'shape': dataclasses.asdict(cfg.shape) if cfg.synthetic else None,
        'models': models,
        'summary': summary_rows(models),
    }


# --------------------------------------------------------------------------------------------- outputs

def _fmt_params(n: int) -> str:
    for unit, div in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
        if n >= div:
            return f'{n / div:.3g}{unit}'
    return str(n)


def _fmt_pct(x: Optional[float]) -> str:
    return '—' if x is None else f'{x:+.1f}%'


def render_max_throughput(result: dict[str, Any]) -> str:
    """max_throughput.md: the measured table, then the paper's numbers in a separate, labelled table."""
    env, wl = result['environment'], result['workload']
    lines = [
        '# Max throughput: dense vs upcycled MoE',
        '',
        '## Measured here',
        '',
        f"Engine `{env['engine']}` (requested `{env['engine_requested']}`), device {env['device']} "
        f"({env['device_name']}), {env['threads']} threads, dtype {env['dtype']}, torch {env['torch']}, "
        f"transformers {env['transformers']}. Workload: {wl['input_tokens']} input / {wl['output_tokens']} "
        f"output tokens per request, {wl['num_requests']} requests per setting; batch sizes "
        f"{wl['batch_sizes'] or '—'}, request rates {wl['rates'] or '—'} req/s. "
        'Max over all settings; change relative to the dense model.',
        '',
        '| model | params (total / active) | max output tokens/s | change vs dense | max total tokens/s '
        '| change vs dense | best setting |',
        '|---|---|---|---|---|---|---|',
    ]
    for r in result['summary']:
        lines.append(
            f"| {r['name']} | {_fmt_params(r['total_params'])} / {_fmt_params(r['active_params'])} "
            f"| {r['max_output_tokens_per_s']:,.1f} | {_fmt_pct(r['output_change_vs_dense_pct'])} "
            f"| {r['max_total_tokens_per_s']:,.1f} | {_fmt_pct(r['total_change_vs_dense_pct'])} | {r['max_at']} |")
    lines += [
        '',
        '## Paper reference (not measured here)',
        '',
        'Doubov, Sardana, Chiley (2024), vLLM 0.6.2 on H100, Mistral vs Mixtral architectures, 3500 input / '
        '300 output tokens, request rate swept, 3 runs averaged. Max throughput in tokens/s.',
        '',
        '| dense | dense tokens/s | MoE | MoE top-1 tokens/s | MoE top-2 tokens/s |',
        '|---|---|---|---|---|',
    ]
    for dname, dense, mname, top1, top2 in PAPER_MAX_THROUGHPUT:
        lines.append(f'| {dname} | {dense:,} | {mname} | {top1:,} ({100 * (top1 / dense - 1):+.0f}%) '
                     f'| {top2:,} ({100 * (top2 / dense - 1):+.0f}%) |')
    return '\n'.join(lines) + '\n'


def write_outputs(result: dict[str, Any], out_dir: str) -> dict[str, str]:
    """Writes max_throughput.md, latency_vs_throughput.png and inference.json (last) into `out_dir`, all or none."""
    from .plots import plot_latency_vs_throughput
    return write_atomically(out_dir, {
        'max_throughput.md': lambda p: Path(p).write_text(render_max_throughput(result)),
        'latency_vs_throughput.png': lambda p: plot_latency_vs_throughput(result, p),
        'inference.json': lambda p: dump_json(result, p),
    })


def benchmark(cfg: BenchConfig, out_dir: str) -> dict[str, Any]:
    """run_benchmark + write_outputs; returns the result (with the written paths under 'files')."""
    result = run_benchmark(cfg)
    result['files'] = write_outputs(result, out_dir)
    return result
