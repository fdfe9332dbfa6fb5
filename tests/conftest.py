"""Shared fixtures: a tiny tokenizer and MDS corpora built from the Python standard library, the shipped
recipes shrunk to d_model 64 / 2 layers, and in-process foundry training."""
from __future__ import annotations

import copy
import os
import sysconfig
import warnings
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

REPO = Path(__file__).resolve().parents[1]
YAMLS = REPO / 'yamls'
SEQ = 32
VOCAB = 256
TINY_MODEL = {'d_model': 64, 'n_layers': 2, 'n_heads': 4, 'vocab_size': VOCAB, 'max_seq_len': SEQ}


def _blanket_ignores() -> int:
    return sum(f[0] == 'ignore' and f[1] is None and f[2] is Warning and f[3] is None for f in warnings.filters)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    """A fixture that silences every warning (`warnings.filterwarnings('ignore')`) is an error: it hides the warnings
    of the tests that use it and of everything else that runs in that scope; scope it with `catch_warnings`."""
    before = _blanket_ignores()
    result = yield
    if _blanket_ignores() > before:
        raise AssertionError(f'{item.nodeid}: a fixture installed a blanket warnings filter ("ignore" for every '
                             'warning); wrap what it silences in warnings.catch_warnings() instead')
    return result


_SHARED_MEMORY_MADE = [0]   # streaming SharedMemory objects created in this process since the counter went in


def _count_shared_memory() -> bool:
    """Counts streaming's SharedMemory constructions (every dataset and every attachment makes some); returns
    False if the counter was already in place."""
    from streaming.base.shared.memory import SharedMemory
    if getattr(SharedMemory.__init__, 'counted', False):
        return False
    init = SharedMemory.__init__

    def counted_init(self, *args, **kwargs):
        _SHARED_MEMORY_MADE[0] += 1
        init(self, *args, **kwargs)
    counted_init.counted = True
    SharedMemory.__init__ = counted_init
    return True


@pytest.fixture(autouse=True)
def release_streaming():
    """After each test that made streaming shared memory: stop the datasets it left iterating and close their
    shared memory. Streaming keeps both until the process exits (`foundry_upcycle/study/streaming_memory.py`); over
    the whole suite the session ran out of file descriptors (1024) without this. A test that made none is skipped:
    the release scans the whole heap (seconds per test in this session's heap)."""
    import sys
    before = _SHARED_MEMORY_MADE[0]
    yield
    if 'streaming' not in sys.modules:
        return
    first = _count_shared_memory()           # streaming was imported during this test: release unconditionally
    if first or _SHARED_MEMORY_MADE[0] != before:
        import gc
        from streaming import StreamingDataset
        from foundry_upcycle.study.streaming_memory import release
        gc.collect()
        release([o for o in gc.get_objects() if issubclass(type(o), StreamingDataset)])


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it), for a `composer -n N --master_port`."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('', 0))
        return s.getsockname()[1]


def stdlib_texts(names: list[str]) -> list[str]:
    root = Path(sysconfig.get_paths()['stdlib'])
    return [(root / n).read_text(encoding='utf-8') for n in names]


def build_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = VOCAB) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ['<|endoftext|>', '<|pad|>']
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<|endoftext|>', eos_token='<|endoftext|>',
                                   pad_token='<|pad|>', unk_token='<|endoftext|>')
    fast.save_pretrained(str(out_dir))
    return out_dir


def write_mds(texts: list[str], tokenizer_dir: Path, out_dir: Path, seq: int = SEQ, val_fraction: float = 0.2):
    """Concatenated token chunks of length `seq`, split into train/ and val/ MDS folders."""
    import numpy as np
    from streaming import MDSWriter
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids: list[int] = []
    for text in texts:
        ids += tok(text)['input_ids'] + [tok.eos_token_id]
    chunks = [np.asarray(ids[i:i + seq], dtype=np.int64) for i in range(0, len(ids) - seq + 1, seq)]
    n_val = min(32, max(8, int(len(chunks) * val_fraction)))
    for split, part in (('train', chunks[n_val:]), ('val', chunks[:n_val])):
        with MDSWriter(out=str(out_dir / split), columns={'tokens': 'ndarray:int64'}) as w:
            for c in part:
                w.write({'tokens': c})
    return out_dir


@pytest.fixture(scope='session')
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer + generic (prose-like stdlib docs) and domain (code) MDS corpora."""
    root = tmp_path_factory.mktemp('corpus')
    generic = stdlib_texts(['this.py', 'textwrap.py', 'argparse.py'])
    domain = stdlib_texts(['heapq.py', 'bisect.py', 'functools.py'])
    tok = build_tokenizer(generic + domain, root / 'tokenizer')
    return {
        'tokenizer': tok,
        'generic': write_mds(generic, tok, root / 'mds' / 'generic'),
        'domain': write_mds(domain, tok, root / 'mds' / 'domain'),
    }


def load_recipe(name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf as om
    return om.to_container(om.load(YAMLS / name), resolve=False)


def tiny_recipe(name: str, corpus: dict[str, Path], out: Path, **variables: Any) -> dict[str, Any]:
    """A shipped recipe with the tiny model and test data; returns a plain dict (variables unresolved)."""
    cfg = load_recipe(name)
    cfg['model'].update(TINY_MODEL)
    cfg['model']['attn_config']['kv_n_heads'] = 2
    is_pretrain = 'pretrain' in name
    cfg['variables'].update({
        'data_dir': str(corpus['generic' if is_pretrain else 'domain']),
        'eval_data_dir': str(corpus['domain' if is_pretrain else 'generic']),
        'tokenizer': str(corpus['tokenizer']),
        'save_folder': str(out / 'checkpoints'),
        'run_name': out.name,
        'max_seq_len': SEQ,
        'max_duration': '2ba',
        'eval_interval': '2ba',
        'save_interval': '2ba',
        'global_batch_size': 4,
        'warmup': '1ba',
    })
    cfg['variables'].update(variables)
    cfg['console_log_interval'] = '1ba'
    cfg['device_eval_batch_size'] = 8
    cfg['eval_subset_num_batches'] = 4
    cfg['loggers'] = {'inmemory': {}}
    return cfg


def run_train(cfg: dict[str, Any]):
    """foundry's own train() in-process; returns the Trainer (fit finished)."""
    from omegaconf import OmegaConf as om
    from llmfoundry.command_utils import train
    return train(om.create(copy.deepcopy(cfg)))


def logged(trainer, key: str) -> list[tuple[int, float]]:
    from composer.loggers import InMemoryLogger
    mem = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    return [(int(ts.batch), float(v)) for ts, v in mem.data.get(key, [])]


@pytest.fixture(scope='session')
def dense_checkpoint(corpus, tmp_path_factory) -> Path:
    """A tiny dense MPT pretrained for 4 steps by the shipped pretrain recipe."""
    out = tmp_path_factory.mktemp('dense')
    trainer = run_train(tiny_recipe('tiny/pretrain.yaml', corpus, out, max_duration='4ba', save_interval='4ba'))
    trainer.close()
    ckpt = out / 'checkpoints' / 'ep0-ba4-rank0.pt'
    assert ckpt.exists(), sorted(p.name for p in (out / 'checkpoints').iterdir())
    return ckpt


def record_result(key: str, value: Any) -> None:
    """Adds `key: value` to the JSON file named by $FOUNDRY_UPCYCLE_RESULTS (scripts/device_check.sh collects the
    GPU numbers this way); nothing without it."""
    import json
    path = os.environ.get('FOUNDRY_UPCYCLE_RESULTS')
    if not path:
        return
    data = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    data[key] = value
    tmp = Path(path + '.tmp')
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
