"""Tokenizer and MDS: a byte-level BPE trained with `tokenizers` on the train text of both corpora and saved as a
Hugging Face tokenizer folder; each split written through foundry's own text-to-MDS code
(`convert_text_to_mds.download_and_convert`: token chunks of `max_seq_len`, EOS between documents), which foundry's
`text` dataloader reads. Imports llmfoundry (slow) only inside `write_mds`."""
from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from foundry_upcycle.study.splits import EOS, PAD, Document


def train_tokenizer(texts: Iterable[str], out_dir: os.PathLike | str, vocab_size: int, max_seq_len: int,
                    progress: bool = False) -> Path:
    """A byte-level BPE trained on `texts`, saved as a Hugging Face tokenizer folder (bos = eos = <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=progress,
                                  special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=max_seq_len)
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)


TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json')


def copy_tokenizer(src: os.PathLike | str, out_dir: os.PathLike | str, max_seq_len: int) -> Path:
    """A model's own tokenizer (a Hugging Face folder) saved into out_dir as a fast tokenizer. ValueError when it
    has no EOS token (documents are separated by it) or is transformers' GGUF tokenizer.model."""
    from transformers import AutoTokenizer
    from foundry_upcycle.gguf import check_tokenizer_dir
    check_tokenizer_dir(Path(src).expanduser(), 'data.tokenizer')
    try:
        tok = AutoTokenizer.from_pretrained(str(Path(src).expanduser()), use_fast=True)
    except (OSError, ValueError) as e:
        raise ValueError(f'data.tokenizer: {src} is not a readable Hugging Face tokenizer folder ({e})') from None
    if tok.eos_token is None:
        raise ValueError(f'data.tokenizer: {src} has no eos_token (the study separates documents with it)')
    tok.model_max_length = max_seq_len
    tok.save_pretrained(str(out_dir))
    return Path(out_dir)


def tokenizer_fingerprint(src: os.PathLike | str) -> dict[str, str]:
    """sha256 of each tokenizer file in a folder: what a tokenizer is, wherever it lives."""
    import hashlib
    root = Path(src).expanduser()
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest()[:16] for name in
            (*TOKENIZER_FILES, 'tokenizer.model', 'vocab.json', 'merges.txt') if (root / name).is_file()}


@contextlib.contextmanager
def _quiet_tqdm(module, quiet: bool):
    """Silences the progress bar a module made with `from tqdm import tqdm` (env overrides are read at import)."""
    if not quiet:
        yield
        return
    bar = module.tqdm
    module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        module.tqdm = bar


def write_mds(docs: Sequence[Document], text_dir: Path, mds_dir: Path, tokenizer_dir: Path,
              max_seq_len: int, eos: str = EOS, progress: bool = False) -> int:
    """Writes docs as text files, then MDS via foundry's text-to-MDS code; returns the number of samples.

    Calls foundry's `download_and_convert` with the files in our order (its folder-level wrapper globs them in
    file-system order), one process, no compression.
    """
    from llmfoundry.command_utils.data_prep import convert_text_to_mds as foundry_text_to_mds
    text_dir.mkdir(parents=True)
    files = []
    for i, doc in enumerate(docs):
        path = text_dir / f'{i:05d}.txt'
        path.write_text(doc.text, encoding='utf-8')
        files.append(str(path))
    with _quiet_tqdm(foundry_text_to_mds, quiet=not progress):
        foundry_text_to_mds.download_and_convert(
            file_names=files, output_folder=str(mds_dir), input_folder=str(text_dir),
            tokenizer_name=str(tokenizer_dir), concat_tokens=max_seq_len, eos_text=eos, bos_text='',
            no_wrap=False, compression=None, trust_remote_code=False)
    index = json.loads((mds_dir / 'index.json').read_text())
    return sum(shard['samples'] for shard in index['shards'])



def document_tokens(docs: Sequence[Document], tokenizer_dir: Path, samples: int, max_seq_len: int,
                    eos: str = EOS) -> list[int]:
    """Each document's length in the MDS token stream (its tokens + the EOS after it), counted as foundry's
    converter tokenizes a file; the stream is cut into `samples` blocks of max_seq_len (the tail is dropped).
    RuntimeError if the counts do not add up to the samples written (then the attribution would be wrong)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.model_max_length = 5_000_000_000
    n_eos = len(tok(eos, truncation=False, padding=False, add_special_tokens=False)['input_ids'])
    lengths = [len(tok(d.text, truncation=False, padding=False)['input_ids']) + n_eos for d in docs]
    if sum(lengths) // max_seq_len != samples:
        raise RuntimeError(f'document token counts ({sum(lengths)} tokens) do not match the {samples} MDS samples '
                           f'of {max_seq_len} tokens that foundry wrote')
    return lengths
