"""Shared test setup: the repo on sys.path, GPT-2 BPE files from ../shared/tiktoken_cache when present
(set in os.environ, so the scripts the tests start inherit it), and the tokenizer as a fixture that
skips where its files can be neither found nor downloaded."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, '..', 'shared')          # real text samples, when this clone sits beside them
sys.path.insert(0, REPO)
if os.path.isdir(os.path.join(SHARED, 'tiktoken_cache')):
    os.environ.setdefault('TIKTOKEN_CACHE_DIR', os.path.abspath(os.path.join(SHARED, 'tiktoken_cache')))


def subprocess_env() -> dict:
    """The environment of a script a test starts: one thread each, unbuffered output."""
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


@pytest.fixture(scope='session')
def gpt2():
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:                            # no cache and no internet
        pytest.skip(f'GPT-2 BPE files for tiktoken unavailable ({type(e).__name__}); '
                    f'set TIKTOKEN_CACHE_DIR or go online')


def random_token_data(folder, vocab: int, n_tokens: int) -> str:
    """folder/train.bin and val.bin of uniformly random token ids (for runs that only need to run)."""
    import numpy as np
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        rng.integers(0, vocab, n_tokens).astype(np.uint16).tofile(os.path.join(folder, f'{split}.bin'))
    return str(folder)
