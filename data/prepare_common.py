"""
What every data/<name>/prepare.py shares: read local documents, tokenize with GPT-2 BPE in parallel,
write train.bin / val.bin (uint16 token ids) and meta.json.

Format of the .bin files: token ids as little-endian uint16 (GPT-2's 50,257 ids fit), every document
followed by the end-of-text token 50256. train.py reads them with np.memmap.

With --vocab N the ids are those of a compact vocabulary instead: GPT-2's BPE restricted to N tokens (the
256 byte tokens, <|endoftext|>, and the most frequent other tokens of the training split), written with
dataset.Vocab.from_gpt2 and described by a meta.pkl (`vocab_size`, `gpt2_ids`); see dataset.py. The files
go to data/<name>_v<N>/ unless --out-dir says otherwise, so the GPT-2 files in data/<name>/ stay.
"""

import argparse
import json
import multiprocessing as mp
import os
import pickle
import random
import shutil
import sys
import tempfile
import time
from typing import Callable, Iterable, Iterator

import numpy as np

GPT2_VOCAB_SIZE = 50257
MIN_VOCAB = 257               # GPT-2's 256 single-byte tokens and <|endoftext|>: the least that stays lossless
CHUNK = 1 << 22               # tokens counted or remapped at a time: ~100 MB of temporaries, whatever the file size
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo, for dataset.py

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
        from dataset import gpt2_encoding
        _encoder = gpt2_encoding()
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


def write_meta(out_dir: str, counts: dict, source: dict, vocab: dict | None = None) -> None:
    """meta.json: human-readable counts per split, the source, and with --vocab the vocabulary's facts."""
    tokenizer = 'tiktoken gpt2 (encode_ordinary, end-of-text 50256 after each document)'
    if vocab:
        tokenizer = (f"tiktoken gpt2 restricted to {vocab['vocab_size']} tokens (ids: kept GPT-2 ids in ascending "
                     f"order; a token not kept is written as its bytes' tokens; see meta.pkl and dataset.py)")
    meta = {'tokenizer': tokenizer, 'dtype': 'uint16', 'vocab_size': GPT2_VOCAB_SIZE, **(vocab or {}),
            **counts, 'source': source}
    with open(os.path.join(out_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=2)
    print(json.dumps({k: v for k, v in meta.items() if k in counts}))


# -----------------------------------------------------------------------------
# --vocab N: GPT-2's BPE restricted to the N most useful tokens of the training split


def check_vocab(n: int) -> None:
    """--vocab is 0 (GPT-2's own ids) or room for the byte tokens and <|endoftext|> at least."""
    if n != 0 and not MIN_VOCAB <= n <= GPT2_VOCAB_SIZE:
        raise ValueError(f"--vocab must be 0 (GPT-2's own {GPT2_VOCAB_SIZE} tokens) or between {MIN_VOCAB} "
                         f"(the 256 byte tokens and <|endoftext|>) and {GPT2_VOCAB_SIZE}, got {n}")


def default_out_dir(home: str, vocab: int) -> str:
    """data/<name> for GPT-2 ids; data/<name>_v<N> for --vocab N, so both can sit side by side."""
    return f"{home}_v{vocab}" if vocab else home


def count_tokens(path: str) -> np.ndarray:
    """How often each GPT-2 id occurs in the uint16 file at path: (50257,) int64, counted chunk by chunk."""
    data = np.memmap(path, dtype=np.uint16, mode='r')
    counts = np.zeros(GPT2_VOCAB_SIZE, dtype=np.int64)
    for i in range(0, len(data), CHUNK):
        counts += np.bincount(data[i:i + CHUNK], minlength=GPT2_VOCAB_SIZE)
    return counts


def choose_kept(counts: np.ndarray, n: int, forced: list[int]) -> list[int]:
    """The GPT-2 ids of an n-token vocabulary, ascending: the forced ids (byte tokens, end-of-text), then
    the most frequent other ids by counts, ties to the lower id so the choice is deterministic. Ids that
    never occur are not kept, so fewer than n come back when counts holds fewer distinct ids than fit."""
    assert len(set(forced)) == len(forced) <= n
    by_use = np.lexsort((np.arange(len(counts)), -counts))     # count descending, then id ascending
    is_forced = np.zeros(len(counts), dtype=bool)
    is_forced[forced] = True
    others = by_use[~is_forced[by_use] & (counts[by_use] > 0)]
    return sorted(forced + others[:n - len(forced)].tolist())


def remap_file(src: str, dst: str, from_gpt2: Callable[[np.ndarray], np.ndarray]) -> int:
    """Write the GPT-2 ids of the uint16 file src into dst as from_gpt2 (a Vocab's) maps them, chunk by chunk.
    Each GPT-2 token maps on its own, so a chunk may end anywhere. Returns the number of tokens written."""
    data = np.memmap(src, dtype=np.uint16, mode='r')
    n = 0
    with open(dst, 'wb') as f:
        for i in range(0, len(data), CHUNK):
            ids = from_gpt2(data[i:i + CHUNK])
            f.write(ids.astype('<u2').tobytes())
            n += len(ids)
    return n


def write_restricted(gpt2_dir: str, out_dir: str, n: int, counts: dict, source: dict) -> None:
    """From the GPT-2 files <split>.bin in gpt2_dir (a temporary folder inside out_dir), write out_dir's
    train.bin, val.bin, meta.pkl and meta.json in the vocabulary of the n most useful tokens of train."""
    from dataset import GPT2_EOT, Vocab, byte_tokens   # here, not at the top: dataset imports torch (seconds)
    t0 = time.time()
    train_counts = count_tokens(os.path.join(gpt2_dir, 'train.bin'))
    gpt2 = Vocab(None)
    forced = sorted(byte_tokens(gpt2.enc)) + [GPT2_EOT]
    kept = choose_kept(train_counts, n, forced)
    vocab = Vocab(kept)
    distinct = int((train_counts > 0).sum())
    share = float(train_counts[kept].sum() / max(1, train_counts.sum()))
    if len(kept) < n:
        print(f"train holds only {distinct:,} distinct GPT-2 tokens: keeping those and the byte tokens, "
              f"vocab_size {len(kept):,} instead of {n:,}")
    print(f"vocab {len(kept):,}: the 256 byte tokens, <|endoftext|> and the {len(kept) - len(forced):,} most frequent "
          f"others of train's {distinct:,} distinct GPT-2 tokens; they cover {share:.2%} of train's GPT-2 tokens")
    restricted = {}
    for split, c in counts.items():
        # written into gpt2_dir, renamed below: no half-written file under a final name
        tokens = remap_file(os.path.join(gpt2_dir, f'{split}.bin'), os.path.join(gpt2_dir, f'{split}.compact'),
                            vocab.from_gpt2)
        restricted[split] = {'tokens': tokens, 'documents': c['documents'], 'gpt2_tokens': c['tokens']}
        print(f"{split}: {c['tokens']:,} GPT-2 tokens -> {tokens:,} tokens ({tokens / max(1, c['tokens']):.4f}x)")
    meta = {'vocab_size': vocab.vocab_size, 'gpt2_ids': kept, 'tokenizer': 'gpt2', 'eot_token': vocab.eot_token}
    with open(os.path.join(gpt2_dir, 'meta.pkl'), 'wb') as f:
        pickle.dump(meta, f)
    write_meta(gpt2_dir, restricted, source, {
        'vocab_size': vocab.vocab_size, 'vocab_requested': n, 'eot_token': vocab.eot_token,
        'train_distinct_gpt2_tokens': distinct, 'kept_share_of_train': round(share, 6)})
    # meta.pkl first: a kill between the renames must never leave compact .bin files without it (they would read
    # as GPT-2 ids); at worst an old .bin stands beside the new meta.pkl, which train.py's id check catches
    for name in ('meta.pkl', 'meta.json'):
        os.replace(os.path.join(gpt2_dir, name), os.path.join(out_dir, name))
    for split in counts:
        os.replace(os.path.join(gpt2_dir, f'{split}.compact'), os.path.join(out_dir, f'{split}.bin'))
    print(f"counted and remapped in {time.time() - t0:.1f}s")


def write_dataset(args: argparse.Namespace, splits: dict[str, tuple[Iterable[str], int | None]], source: dict) -> None:
    """Tokenize each split's documents (splits: name -> (documents, how many)) into args.out_dir/<split>.bin
    and write meta.json: GPT-2 ids, or with --vocab N those of the restricted vocabulary (and meta.pkl)."""
    os.makedirs(args.out_dir, exist_ok=True)
    if not args.vocab:
        stale = os.path.join(args.out_dir, 'meta.pkl')
        if os.path.exists(stale):       # it would make readers take these GPT-2 ids for compact ones
            os.remove(stale)
            print(f"removed {stale}: this folder now holds GPT-2 ids")
        counts = {split: write_split(docs, args.out_dir, split, args.num_proc, total)
                  for split, (docs, total) in splits.items()}
        write_meta(args.out_dir, counts, source)
        return
    # GPT-2 ids first, into a temporary folder inside out_dir (same file system, so the final renames are
    # atomic); removed however the run ends, also on Ctrl-C
    gpt2_dir = tempfile.mkdtemp(prefix='gpt2-', suffix='.tmp', dir=args.out_dir)
    try:
        counts = {split: write_split(docs, gpt2_dir, split, args.num_proc, total)
                  for split, (docs, total) in splits.items()}
        write_restricted(gpt2_dir, args.out_dir, args.vocab, counts, source)
    finally:
        shutil.rmtree(gpt2_dir, ignore_errors=True)


def make_parser(doc: str, default_out_dir: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', nargs='+', metavar='FILE',
                        help=f"local text files (documents separated by lines holding {EOT_LINE}) instead of the hub")
    parser.add_argument('--val-input', metavar='FILE', help="local validation text; default: hold out --val-fraction")
    parser.add_argument('--val-fraction', type=float, default=0.005, help="share of documents held out for val")
    parser.add_argument('--seed', type=int, default=2357, help="seed of the random hold-out")
    parser.add_argument('--num-proc', type=int, default=max(1, (os.cpu_count() or 2) // 2), help="tokenizer processes")
    parser.add_argument('--vocab', type=int, default=0, metavar='N',
                        help=f"restrict GPT-2's BPE to the N most useful tokens of train "
                             f"({MIN_VOCAB}..{GPT2_VOCAB_SIZE}), losslessly; 0 = GPT-2's own ids")
    parser.add_argument('--out-dir', help=f"where train.bin, val.bin, meta.json (and meta.pkl) go; default "
                                          f"{default_out_dir}, or {default_out_dir}_v<N> with --vocab N")
    parser.set_defaults(home=default_out_dir)      # the dataset's folder, for parse_args' default --out-dir
    return parser


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments, --vocab checked (one-line error) and --out-dir filled in."""
    args = parser.parse_args()
    check_vocab(args.vocab)
    args.out_dir = args.out_dir or default_out_dir(args.home, args.vocab)
    return args


def prepare_local(args: argparse.Namespace) -> None:
    """The --input path shared by every prepare.py."""
    docs = read_documents(args.input)
    if args.val_input:
        train_docs, val_docs = docs, read_documents([args.val_input])
    else:
        train_ids, val_ids = hold_out(len(docs), args.val_fraction, args.seed)
        train_docs, val_docs = [docs[i] for i in train_ids], [docs[i] for i in val_ids]
    source = {'input': [os.path.abspath(p) for p in args.input],
              'val_input': os.path.abspath(args.val_input) if args.val_input else None,
              'val_fraction': None if args.val_input else args.val_fraction, 'seed': args.seed}
    write_dataset(args, {'train': (train_docs, len(train_docs)), 'val': (val_docs, len(val_docs))}, source)


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
