"""data/*/prepare.py as a user runs them, on small local text files."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, SHARED, subprocess_env as env

sys.path.insert(0, os.path.join(REPO, 'data'))
from prepare_common import hold_out, read_documents  # noqa: E402

DOCS = ['Once upon a time, there was a cat.\nThe cat liked milk.', 'Tom had a red ball. <|endoftext|> is just text here.',
        'The sun was hot.', 'Lily and Ben played in the park.\n\nThey were happy.', 'A dog ran.', 'The end of the story.']


def write_docs(path, docs):
    path.write_text(''.join(d + '\n<|endoftext|>\n' for d in docs), encoding='utf-8')


def prepare(name: str, *args, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, f'data/{name}/prepare.py', *map(str, args)], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=300)
    if check and p.returncode:
        raise AssertionError(p.stderr)
    return p


def test_read_documents_splits_on_separator_lines(tmp_path):
    f = tmp_path / 'a.txt'
    write_docs(f, DOCS)
    assert read_documents([str(f)]) == DOCS           # an inline <|endoftext|> is text, not a separator
    g = tmp_path / 'b.txt'
    g.write_text('first\n<|endoftext|>\n\n<|endoftext|>\nlast, no separator')
    assert read_documents([str(g), str(f)]) == ['first', 'last, no separator', *DOCS]


def test_hold_out_is_random_seeded_and_complete():
    train, val = hold_out(1000, 0.05, seed=1)
    assert len(val) == 50 and sorted(train + val) == list(range(1000))
    assert hold_out(1000, 0.05, seed=1) == (train, val)
    assert hold_out(1000, 0.05, seed=2)[1] != val
    assert max(val) > 500                               # not a prefix
    with pytest.raises(ValueError, match='--val-input'):
        hold_out(1, 0.5, seed=0)


@pytest.mark.parametrize('name', ['tinystories', 'openwebtext'])
def test_local_input_with_val_file(name, tmp_path, gpt2):
    enc = gpt2
    train_txt, val_txt = tmp_path / 'train.txt', tmp_path / 'val.txt'
    write_docs(train_txt, DOCS[:4])
    write_docs(val_txt, DOCS[4:])
    prepare(name, '--input', train_txt, '--val-input', val_txt, '--out-dir', tmp_path / 'out', '--num-proc', 2)
    meta = json.loads((tmp_path / 'out' / 'meta.json').read_text())
    for split, docs in (('train', DOCS[:4]), ('val', DOCS[4:])):
        ids = np.fromfile(tmp_path / 'out' / f'{split}.bin', dtype=np.uint16)
        expected = [t for d in docs for t in enc.encode_ordinary(d) + [50256]]   # by hand
        assert ids.tolist() == expected
        assert meta[split] == {'tokens': len(expected), 'documents': len(docs)}
        assert enc.decode(ids.tolist()) == ''.join(d + '<|endoftext|>' for d in docs)   # round trip
    assert meta['source']['input'] == [str(train_txt)]


def test_held_out_val_is_deterministic(tmp_path, gpt2):
    docs = [f'Story number {i}. ' + 'The cat sat. ' * (i % 5) for i in range(200)]
    src = tmp_path / 'all.txt'
    write_docs(src, docs)
    outs = []
    for run in ('a', 'b'):
        prepare('tinystories', '--input', src, '--out-dir', tmp_path / run, '--val-fraction', 0.1, '--seed', 7,
                '--num-proc', 1)
        outs.append((tmp_path / run / 'val.bin').read_bytes())
    assert outs[0] == outs[1]
    meta = json.loads((tmp_path / 'a' / 'meta.json').read_text())
    assert meta['val']['documents'] == 20 and meta['train']['documents'] == 180


def test_real_tinystories_sample(tmp_path, gpt2):
    src = os.path.join(SHARED, 'data', 'tinystories', 'val.txt')
    if not os.path.isfile(src):
        pytest.skip('../shared/data is not here')
    enc = gpt2
    with open(src, encoding='utf-8') as f:
        stories = f.read().split('\n<|endoftext|>\n')[:-1]
    sample = random.Random(0).sample(stories, 50)          # the files are grouped by source: sample
    write_docs(tmp_path / 's.txt', sample)
    prepare('tinystories', '--input', tmp_path / 's.txt', '--out-dir', tmp_path / 'out', '--val-fraction', 0.1)
    ids = np.concatenate([np.fromfile(tmp_path / 'out' / f'{s}.bin', dtype=np.uint16) for s in ('train', 'val')])
    assert (ids == 50256).sum() == 50
    assert len(ids) == sum(len(enc.encode_ordinary(s)) + 1 for s in sample)


def test_errors_are_one_line(tmp_path):
    p = prepare('tinystories', '--input', tmp_path / 'nope.txt', check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    assert p.stderr.strip() == f"error: input file {tmp_path / 'nope.txt'} not found"
    empty = tmp_path / 'empty.txt'
    empty.write_text('\n<|endoftext|>\n')
    p = prepare('openwebtext', '--input', empty, check=False)
    assert p.returncode != 0 and 'no documents' in p.stderr and 'Traceback' not in p.stderr


@pytest.mark.parametrize('name', ['tinystories', 'openwebtext'])
def test_hub_unreachable_points_to_input(name, tmp_path):
    pytest.importorskip('datasets')
    p = subprocess.run([sys.executable, f'data/{name}/prepare.py', '--out-dir', str(tmp_path)], cwd=REPO,
                       env={**env(), 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    assert 'Hugging Face hub' in p.stderr and '--input FILE' in p.stderr
    assert not list(tmp_path.glob('*.bin'))
