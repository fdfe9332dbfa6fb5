"""Held-out cross-entropy per document: every token's loss, attributed to the held-out document it belongs to.

An MDS split written by foundry's text-to-MDS converter is one token stream (each document, then EOS) cut into
samples of max_seq_len. Foundry's `LanguageCrossEntropy` predicts, in each sample, token j + 1 from tokens <= j
(`get_targets`: the labels rolled by one, the last position ignored); so does this, token by token, and the loss of
the token at stream position p goes to the document whose span holds p (spans from the data manifest, EOS
included). The split's CE is then the sum over documents, exactly foundry's number, and the per-document sums are
what the study resamples for the noise of its held-out set. Without spans (a user's MDS data), each sample is its
own unit ("sequence blocks").
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

UNIT_DOCUMENT = 'document'
UNIT_BLOCK = 'sequence block'


def open_split(tokenizer, mds_dir: Path, seq_len: int, batch_size: int):
    """Foundry's own text dataset over one MDS split, in order (no shuffle)."""
    from llmfoundry.data.text_data import StreamingTextDataset
    return StreamingTextDataset(tokenizer=tokenizer, max_seq_len=seq_len, local=str(mds_dir), split=None,
                                shuffle=False, batch_size=batch_size)


def _owner(doc_tokens: Optional[Sequence[int]], samples: int, seq_len: int) -> np.ndarray:
    """[samples, seq_len - 1]: the unit (document, or sample) of every predicted token."""
    positions = np.arange(samples)[:, None] * seq_len + np.arange(1, seq_len)[None, :]
    if doc_tokens is None:
        return np.repeat(np.arange(samples)[:, None], seq_len - 1, axis=1)
    ends = np.cumsum(np.asarray(doc_tokens, dtype=np.int64))
    assert ends[-1] >= samples * seq_len, 'document spans shorter than the token stream'
    return np.searchsorted(ends, positions, side='right')


def heldout_losses(model, dataset, batch_size: int, doc_tokens: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """{'ce': token-weighted CE, 'units': [[nll_sum, tokens], ...] per document (or sequence block), 'unit': ...}."""
    import torch
    import torch.nn.functional as F
    samples = len(dataset)
    seq_len = int(dataset.max_seq_len)
    owner = _owner(doc_tokens, samples, seq_len)
    n_units = len(doc_tokens) if doc_tokens is not None else samples
    nll = np.zeros(n_units, dtype=np.float64)
    count = np.zeros(n_units, dtype=np.int64)
    model.eval()
    with torch.no_grad():
        for start in range(0, samples, batch_size):
            ids = torch.stack([dataset[i] for i in range(start, min(samples, start + batch_size))])
            assert ids.shape[1] == seq_len, f'sample of {ids.shape[1]} tokens in a split of max_seq_len {seq_len}'
            logits = model({'input_ids': ids, 'attention_mask': torch.ones_like(ids)}).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                   reduction='none').view(ids.shape[0], seq_len - 1)
            rows = owner[start:start + ids.shape[0]].reshape(-1)
            np.add.at(nll, rows, loss.double().numpy().reshape(-1))
            np.add.at(count, rows, 1)
    assert count.sum() == samples * (seq_len - 1)
    return {'ce': float(nll.sum() / count.sum()), 'units': [[float(a), int(b)] for a, b in zip(nll, count)],
            'unit': UNIT_DOCUMENT if doc_tokens is not None else UNIT_BLOCK}
