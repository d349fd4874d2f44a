"""
The prepared data on disk, as train.py, sample.py and compare.py read it: data/<dataset>/train.bin and val.bin,
uint16 token ids written by data/<dataset>/prepare.py, the windows of block_size tokens a batch is cut from,
and the vocabulary the ids belong to.

Two vocabularies exist. A folder without meta.pkl holds GPT-2 ids (50,257 of them). A folder written by
`prepare.py --vocab N` (default data/<name>_v<N>/, e.g. --dataset=tinystories_v4096) holds compact ids of
GPT-2's BPE restricted to N tokens, and a meta.pkl whose `gpt2_ids` lists the GPT-2 id of each compact id.
Compact ids are the kept GPT-2 ids in ascending order, so ids 0-255 are GPT-2's 256 single-byte tokens
(GPT-2 ids 0-255 too, though not in byte order) and <|endoftext|> (GPT-2's last id, 50256) is id N-1. A GPT-2
token that was not kept is written as the byte tokens of its bytes, so every text still encodes exactly.

    vocab = vocab_for_data_dir(resolve_data_dir(data_dir, dataset))   # GPT-2 or compact, by meta.pkl
    ids = vocab.encode('Once upon a time')                             # list of ids of that vocabulary
    text = vocab.decode(ids)                                           # exactly the text again
    vocab.vocab_size, vocab.eot_token                                  # e.g. 4096 and 4095
"""

import os
import pickle
import re

import numpy as np
import torch

GPT2_VOCAB_SIZE = 50257       # GPT-2 BPE: 256 byte tokens, 50,000 merges, <|endoftext|>
GPT2_EOT = 50256


def open_data(data_dir: str, dataset: str, block_size: int) -> dict[str, np.memmap]:
    """The uint16 token files of both splits, checked to exist and to hold more than one block."""
    data = {}
    for split in ('train', 'val'):
        path = os.path.join(data_dir, f'{split}.bin')
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found; run {prepare_command(dataset)} "
                                    f"(or set --data_dir to a folder holding train.bin and val.bin)")
        data[split] = np.memmap(path, dtype=np.uint16, mode='r')
        if len(data[split]) <= block_size + 1:
            raise ValueError(f"{path} holds {len(data[split])} tokens, fewer than block_size+1 = {block_size + 1}; "
                             f"use more text or a smaller --block_size")
    return data


def prepare_command(dataset: str) -> str:
    """The command that writes data/<dataset>: data/<name>_v<N> comes from data/<name>/prepare.py --vocab N."""
    m = re.fullmatch(r'(.+)_v(\d+)', dataset)
    return f"python data/{m[1]}/prepare.py --vocab {m[2]}" if m else f"python data/{dataset}/prepare.py"


def check_ids_fit(data: dict[str, np.ndarray], meta: dict, data_dir: str, dataset: str) -> None:
    """Raise ValueError (one line, with the fix) if a split holds an id outside meta.pkl's vocabulary: a GPT-2
    .bin left beside a compact meta.pkl (or a .bin of a larger --vocab) would index past the embedding, an
    IndexError on the CPU and a device-side assert on a GPU. One max over each uint16 memmap: it reads the
    file once (0.05 s for 0.5 GB in the page cache)."""
    n = meta['vocab_size']
    for split, ids in data.items():
        top = int(ids.max())
        if top >= n:
            default = os.path.realpath(data_dir) == os.path.realpath(resolve_data_dir('', dataset))
            fix = (prepare_command(dataset) if default and re.fullmatch(r'.+_v\d+', dataset)
                   else f"python data/<name>/prepare.py --vocab {n} --out-dir {data_dir}")
            raise ValueError(f"{os.path.join(data_dir, split + '.bin')} holds token id {top:,}, but the meta.pkl "
                             f"beside it describes {n:,} ids (0..{n - 1:,}): the .bin files were not written with "
                             f"this meta.pkl (a GPT-2 .bin left from an earlier prepare.py?); write the folder "
                             f"again with {fix}")


def windows(data: np.ndarray, offsets: np.ndarray, block_size: int, device: str = 'cpu') -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs data[i : i+T] and targets data[i+1 : i+1+T] for every offset i: (B, T) int64 each."""
    x = torch.from_numpy(np.stack([data[i:i + block_size].astype(np.int64) for i in offsets]))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size].astype(np.int64) for i in offsets]))
    if device.startswith('cuda'):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def resolve_data_dir(data_dir: str, dataset: str) -> str:
    """data_dir if set, else data/<dataset> next to this script."""
    return data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)


# -----------------------------------------------------------------------------
# the vocabulary of a data folder: meta.pkl, read safely, and a tokenizer over it


class _NotPlain(pickle.UnpicklingError):
    """Raised by _PlainUnpickler for anything in a pickle that is not a plain value."""


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles only plain values (int, float, str, bytes, bool, None, list, tuple, dict, set): pickle builds
    those with its own opcodes, while everything that can run code (a class, a function such as os.system, an
    extension code) must first be looked up through find_class, or come from persistent_load. Refusing both
    stops a crafted file before any call is made: the lookup comes before the REDUCE that would call it."""

    def find_class(self, module: str, name: str):
        raise _NotPlain(f"{module}.{name}")

    def persistent_load(self, pid):
        raise _NotPlain(f"persistent id {pid!r}")


def read_meta(path: str) -> dict:
    """The dict of a meta.pkl written by prepare.py --vocab N, checked: `vocab_size` (int) and `gpt2_ids` (the
    GPT-2 id of each compact id: vocab_size distinct ints in 0..50256). Only plain values are unpickled; a
    file that asks for anything else is refused before anything in it runs."""
    fix = "write it again with python data/<name>/prepare.py --vocab N"
    try:
        with open(path, 'rb') as f:
            meta = _PlainUnpickler(f).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found; {fix}") from None
    except _NotPlain as e:
        raise ValueError(f"{path} is not a plain meta.pkl written by this repo's prepare.py: it asks for "
                         f"{_one_line(e)}, which could run code, so it was not unpickled; {fix}") from None
    except Exception as e:           # garbage can fail in many ways inside pickle: all mean the same here
        raise ValueError(f"{path} is corrupt or truncated ({type(e).__name__}: {_one_line(e)}); {fix}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds a {type(meta).__name__}, not the dict prepare.py writes; {fix}")
    problem = _meta_problem(meta)
    if problem:
        raise ValueError(f"{path} is not a consistent vocabulary: {problem}; {fix}")
    return meta


def _one_line(e: Exception) -> str:
    """The message of e on one short line (a crafted file chooses the names that end up in it)."""
    return ' '.join(str(e).split())[:100]


def _meta_problem(meta: dict) -> str:
    """What is wrong with the vocab_size and gpt2_ids of a meta dict, or '' if nothing."""
    n, ids = meta.get('vocab_size'), meta.get('gpt2_ids')
    if type(n) is not int:                                       # not isinstance: True is an int too
        return f"vocab_size must be an int, got {n!r}"
    if not isinstance(ids, (list, tuple)) or not all(type(t) is int for t in ids):
        return "gpt2_ids must be a list of ints (the GPT-2 id of each compact id)"
    if len(ids) != n:
        return f"gpt2_ids has {len(ids)} entries but vocab_size is {n}"
    if ids and not 0 <= min(ids) <= max(ids) < GPT2_VOCAB_SIZE:
        return f"gpt2_ids must lie in 0..{GPT2_VOCAB_SIZE - 1}, got {min(ids)}..{max(ids)}"
    if len(set(ids)) != len(ids):
        return f"gpt2_ids repeats {len(ids) - len(set(ids))} id(s)"
    missing = sorted((set(range(256)) | {GPT2_EOT}) - set(ids))   # GPT-2's byte tokens are its ids 0-255 (byte_tokens)
    if missing:
        return f"gpt2_ids lacks the byte or end-of-text tokens {missing[:8]} that every text falls back on"
    return ''


def byte_tokens(enc) -> list[int]:
    """The GPT-2 token of each byte value: byte_tokens(enc)[b] is the id of the one-byte token bytes([b]).
    GPT-2's 256 byte tokens are ids 0-255, but not in byte order ('!' is 0, 'A' is 32, byte 0 is 188): its
    byte-to-unicode table lists the printable bytes first."""
    return [enc.encode_single_token(bytes([b])) for b in range(256)]


def gpt2_encoding() -> 'tiktoken.Encoding':
    """GPT-2's BPE (tiktoken). tiktoken downloads its two files once into its cache; where that fails (no
    internet), one clear error: point TIKTOKEN_CACHE_DIR at a folder that holds them."""
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:                  # requests' ConnectionError, a proxy's error page, a cut-off file...
        where = os.environ.get('TIKTOKEN_CACHE_DIR')
        raise FileNotFoundError(
            f"GPT-2's BPE files could not be loaded ({type(e).__name__}"
            f"{f', TIKTOKEN_CACHE_DIR={where}' if where else ''}): connect to the internet once, or set "
            f"TIKTOKEN_CACHE_DIR to a folder holding them (tiktoken's cache from a machine with internet)") from None


class Vocab:
    """GPT-2's BPE, restricted to the GPT-2 ids in gpt2_ids (None: all 50,257, GPT-2's own vocabulary).

    Compact id i stands for GPT-2 id gpt2_ids[i]. encode runs GPT-2's BPE, then writes each GPT-2 token
    that is kept as its compact id and each one that is not as the compact ids of its bytes' tokens (so
    gpt2_ids must hold the 256 byte tokens and <|endoftext|>). decode maps back to GPT-2 ids and decodes the
    whole list at once: a character whose UTF-8 bytes were split over byte tokens comes back whole.

    from_gpt2 is the one place the GPT-2 -> compact mapping exists; prepare.py remaps its files with it."""

    def __init__(self, gpt2_ids: list[int] | None = None):
        self.enc = gpt2_encoding()
        ids = list(range(GPT2_VOCAB_SIZE)) if gpt2_ids is None else [int(t) for t in gpt2_ids]
        problem = _meta_problem({'vocab_size': len(ids), 'gpt2_ids': ids})
        missing = sorted(set(byte_tokens(self.enc) + [GPT2_EOT]) - set(ids)) if not problem else []
        if problem or missing:
            raise ValueError(f"gpt2_ids is not a vocabulary with byte fallback: "
                             f"{problem or f'it lacks the byte or end-of-text tokens {missing[:8]}'}")
        self.gpt2_ids = np.array(ids, dtype=np.int64)            # (vocab_size,) compact id -> GPT-2 id
        self.vocab_size = len(ids)
        compact = [-1] * GPT2_VOCAB_SIZE                          # GPT-2 id -> compact id, -1 if not kept
        for i, t in enumerate(ids):
            compact[t] = i
        self.eot_token = compact[GPT2_EOT]
        # The expansion of every GPT-2 token, as one flat table: token t becomes
        # flat[first[t] : first[t] + length[t]], i.e. its compact id, or the compact ids of its bytes' tokens.
        byte_ids = [compact[t] for t in byte_tokens(self.enc)]
        lengths, flat = [], []
        for t in range(GPT2_VOCAB_SIZE):
            piece = [compact[t]] if compact[t] >= 0 else [byte_ids[b] for b in self.enc.decode_single_token_bytes(t)]
            lengths.append(len(piece))
            flat.extend(piece)
        self._length = np.array(lengths, dtype=np.int64)          # (50257,)
        self._first = np.cumsum(self._length) - self._length     # (50257,) where each expansion starts in flat
        self._flat = np.array(flat, dtype=np.uint16)              # (sum of lengths,) compact ids

    def __repr__(self) -> str:
        return f"Vocab(vocab_size={self.vocab_size}, eot_token={self.eot_token})"

    def from_gpt2(self, ids: np.ndarray) -> np.ndarray:
        """GPT-2 ids (n,) -> compact ids (m,), m >= n, as uint16 (the dtype of the .bin files). Vectorised,
        for hundreds of millions of tokens in chunks: no Python loop over tokens."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and not 0 <= ids.min() <= ids.max() < GPT2_VOCAB_SIZE:
            raise ValueError(f"GPT-2 ids must lie in 0..{GPT2_VOCAB_SIZE - 1}, got {ids.min()}..{ids.max()}")
        length = self._length[ids]                               # (n,) output tokens of each input token
        out_first = np.cumsum(length) - length                   # (n,) where each one's output starts
        # output position j of input token i reads flat[first[ids[i]] + (j - out_first[i])]
        src = np.repeat(self._first[ids] - out_first, length) + np.arange(length.sum())   # (m,)
        return self._flat[src]

    def encode(self, text: str, allow_eot: bool = False) -> list[int]:
        """Ids of text: GPT-2's encode_ordinary (text that looks like <|endoftext|> is plain text), mapped to
        this vocabulary. allow_eot=True makes the text <|endoftext|> the end-of-text token instead, as a
        prompt that starts a new document wants."""
        gpt2 = self.enc.encode(text, allowed_special={'<|endoftext|>'}) if allow_eot else self.enc.encode_ordinary(text)
        return self.from_gpt2(np.array(gpt2, dtype=np.int64)).tolist()

    def decode(self, ids: list[int] | np.ndarray) -> str:
        """The text of ids (1-D) of this vocabulary; bytes that are not valid UTF-8 (as a character cut short by
        the end of ids) become U+FFFD."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and not 0 <= ids.min() <= ids.max() < self.vocab_size:
            raise ValueError(f"token ids must lie in 0..{self.vocab_size - 1} for this vocabulary, "
                             f"got {ids.min()}..{ids.max()}")
        return self.enc.decode(self.gpt2_ids[ids].tolist())


def vocab_for_data_dir(data_dir: str) -> Vocab:
    """The vocabulary of the ids in data_dir: compact if it holds a meta.pkl (read_meta), else GPT-2's."""
    path = os.path.join(data_dir, 'meta.pkl')
    if not os.path.isfile(path):
        return Vocab(None)
    gpt2_ids = read_meta(path)['gpt2_ids']
    try:
        return Vocab(gpt2_ids)
    except ValueError as e:
        raise ValueError(f"{path}: {e}; write it again with python data/<name>/prepare.py --vocab N") from None
