"""
What every data/<name>/prepare.py shares: read local documents, tokenize with GPT-2 BPE in parallel,
write train.bin / val.bin (uint16 token ids) and meta.json.

Format of the .bin files: token ids as little-endian uint16 (GPT-2's 50,257 ids fit), every document
followed by the end-of-text token 50256. train.py reads them with np.memmap.
"""

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
from typing import Iterable, Iterator

import numpy as np

EOT_LINE = '<|endoftext|>'   # a line holding exactly this separates documents in local text files


def read_documents(paths: list[str]) -> list[str]:
    """Documents of text files in which a line holding exactly <|endoftext|> ends each document."""
    docs = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file {path} not found")
        lines = []
        with open(path, encoding='utf-8') as f:
            for line in f:
                if line.rstrip('\r\n') == EOT_LINE:
                    docs.append('\n'.join(lines))
                    lines = []
                else:
                    lines.append(line.rstrip('\r\n'))
        docs.append('\n'.join(lines))                # text after the last separator, if any
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"no documents in {', '.join(paths)}")
    return docs


def hold_out(n_docs: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the train and val documents: a random (not a prefix: sample files are often grouped by
    source) val_fraction of the documents, at least one, chosen by seed. Both lists are in order."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if n_docs < 2:
        raise ValueError("need at least 2 documents to hold some out for validation; pass --val-input")
    val = set(random.Random(seed).sample(range(n_docs), max(1, round(n_docs * val_fraction))))
    return [i for i in range(n_docs) if i not in val], sorted(val)


_encoder = None


def _encode(doc: str) -> np.ndarray:
    """GPT-2 BPE of one document plus the end-of-text token (encode_ordinary: text that looks like a
    special token is encoded as plain text)."""
    global _encoder
    if _encoder is None:                             # one encoder per worker process
        import tiktoken
        _encoder = tiktoken.get_encoding('gpt2')
    ids = _encoder.encode_ordinary(doc)
    ids.append(_encoder.eot_token)
    return np.array(ids, dtype=np.uint16)


def tokenize(docs: Iterable[str], num_proc: int, total: int | None = None, desc: str = 'tokenizing') -> Iterator[np.ndarray]:
    """Token arrays of the documents, in order, encoded by num_proc worker processes, with a progress bar."""
    from tqdm import tqdm
    _encode('')                                       # load the BPE files once here: a clear error if missing
    if num_proc <= 1:
        yield from tqdm(map(_encode, docs), total=total, desc=desc, unit='doc')
        return
    with mp.Pool(num_proc) as pool:
        yield from tqdm(pool.imap(_encode, docs, chunksize=64), total=total, desc=desc, unit='doc')


def write_tokens(arrays: Iterable[np.ndarray], path: str) -> int:
    """Stream token arrays into path as uint16; via a temporary file and a rename, so an interrupted run
    never leaves a half-written file under the final name. Returns the number of tokens."""
    tmp = path + '.tmp'
    n = 0
    with open(tmp, 'wb') as f:
        for ids in arrays:
            f.write(ids.astype('<u2').tobytes())
            n += len(ids)
    os.replace(tmp, path)
    return n


def write_split(docs: Iterable[str], out_dir: str, split: str, num_proc: int, total: int | None = None) -> dict:
    """Tokenize documents into out_dir/<split>.bin; returns its counts for meta.json."""
    counter = {'documents': 0}

    def counted() -> Iterator[str]:
        for d in docs:
            counter['documents'] += 1
            yield d
    tokens = write_tokens(tokenize(counted(), num_proc, total, desc=split), os.path.join(out_dir, f'{split}.bin'))
    return {'tokens': tokens, 'documents': counter['documents']}


def write_meta(out_dir: str, counts: dict, source: dict) -> None:
    meta = {'tokenizer': 'tiktoken gpt2 (encode_ordinary, end-of-text 50256 after each document)',
            'dtype': 'uint16', 'vocab_size': 50257, **{f'{k}': v for k, v in counts.items()}, 'source': source}
    with open(os.path.join(out_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=2)
    print(json.dumps({k: v for k, v in meta.items() if k in counts}))


def make_parser(doc: str, default_out_dir: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', nargs='+', metavar='FILE',
                        help=f"local text files (documents separated by lines holding {EOT_LINE}) instead of the hub")
    parser.add_argument('--val-input', metavar='FILE', help="local validation text; default: hold out --val-fraction")
    parser.add_argument('--val-fraction', type=float, default=0.005, help="share of documents held out for val")
    parser.add_argument('--seed', type=int, default=2357, help="seed of the random hold-out")
    parser.add_argument('--num-proc', type=int, default=max(1, (os.cpu_count() or 2) // 2), help="tokenizer processes")
    parser.add_argument('--out-dir', default=default_out_dir, help="where train.bin, val.bin, meta.json go")
    return parser


def prepare_local(args: argparse.Namespace) -> None:
    """The --input path shared by every prepare.py."""
    docs = read_documents(args.input)
    if args.val_input:
        train_docs, val_docs = docs, read_documents([args.val_input])
    else:
        train_ids, val_ids = hold_out(len(docs), args.val_fraction, args.seed)
        train_docs, val_docs = [docs[i] for i in train_ids], [docs[i] for i in val_ids]
    os.makedirs(args.out_dir, exist_ok=True)
    counts = {split: write_split(d, args.out_dir, split, args.num_proc, len(d))
              for split, d in (('train', train_docs), ('val', val_docs))}
    source = {'input': [os.path.abspath(p) for p in args.input],
              'val_input': os.path.abspath(args.val_input) if args.val_input else None,
              'val_fraction': None if args.val_input else args.val_fraction, 'seed': args.seed}
    write_meta(args.out_dir, counts, source)


def hub_unreachable(name: str, error: Exception) -> None:
    """One clear message, no traceback, when the Hugging Face hub cannot be reached."""
    sys.exit(f"error: could not load {name} from the Hugging Face hub ({type(error).__name__}: "
             f"{str(error).splitlines()[0][:200] if str(error) else 'no details'}). Without internet, "
             f"tokenize local text instead: --input FILE [FILE ...] [--val-input FILE]")


def run(main) -> None:
    """Run a prepare.py main with user errors shown as one line."""
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
