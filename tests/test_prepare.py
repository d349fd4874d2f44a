"""data/*/prepare.py as a user runs them, on small local text files: inside this process (conftest.run_script), and
each script once as a process of its own (test_hub_unreachable_points_to_input)."""

import argparse
import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, SHARED, run_script, subprocess_env as env

sys.path.insert(0, os.path.join(REPO, 'data'))
import prepare_common  # noqa: E402
from prepare_common import (count_tokens, default_out_dir, hold_out, read_documents, remap_file,  # noqa: E402
                            write_dataset)

DOCS = ['Once upon a time, there was a cat.\nThe cat liked milk.', 'Tom had a red ball. <|endoftext|> is just text here.',
        'The sun was hot.', 'Lily and Ben played in the park.\n\nThey were happy.', 'A dog ran.', 'The end of the story.']


def write_docs(path, docs):
    path.write_text(''.join(d + '\n<|endoftext|>\n' for d in docs), encoding='utf-8')


def prepare(name: str, *args, check=True) -> subprocess.CompletedProcess:
    """python data/NAME/prepare.py ARGS, inside this process."""
    return run_script(f'data/{name}/prepare.py', args, check=check)


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
    """Each script once as a process of its own: exit code, stderr, and Hugging Face's offline switches, which datasets
    reads when it is imported."""
    pytest.importorskip('datasets')
    p = subprocess.run([sys.executable, f'data/{name}/prepare.py', '--out-dir', str(tmp_path)], cwd=REPO,
                       env={**env(), 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    assert 'Hugging Face hub' in p.stderr and '--input FILE' in p.stderr
    assert not list(tmp_path.glob('*.bin'))


# -----------------------------------------------------------------------------
# --vocab N


def test_vocab_0_is_gpt2_ids_unchanged(tmp_path, gpt2):
    src = tmp_path / 'all.txt'
    write_docs(src, DOCS)
    prepare('tinystories', '--input', src, '--out-dir', tmp_path / 'plain', '--val-fraction', 0.3)
    prepare('tinystories', '--input', src, '--out-dir', tmp_path / 'zero', '--val-fraction', 0.3, '--vocab', 0)
    assert sorted(os.listdir(tmp_path / 'zero')) == ['meta.json', 'train.bin', 'val.bin']     # no meta.pkl
    for name in ('train.bin', 'val.bin', 'meta.json'):
        assert (tmp_path / 'plain' / name).read_bytes() == (tmp_path / 'zero' / name).read_bytes()
    assert json.loads((tmp_path / 'zero' / 'meta.json').read_text())['vocab_size'] == 50257


@pytest.mark.parametrize('name', ['tinystories', 'openwebtext'])
def test_vocab_restricted_local(name, tmp_path, gpt2):
    from dataset import read_meta, vocab_for_data_dir
    train_txt, val_txt = tmp_path / 'train.txt', tmp_path / 'val.txt'
    write_docs(train_txt, DOCS[:4])
    write_docs(val_txt, DOCS[4:] + ['Zebras gallop über Straßen.'])
    out = tmp_path / 'out'
    p = prepare(name, '--input', train_txt, '--val-input', val_txt, '--out-dir', out, '--vocab', 270)
    assert sorted(os.listdir(out)) == ['meta.json', 'meta.pkl', 'train.bin', 'val.bin']    # temporaries gone
    meta = read_meta(str(out / 'meta.pkl'))
    counts = np.bincount([t for d in DOCS[:4] for t in gpt2.encode_ordinary(d)], minlength=50257)
    others = sorted(range(256, 50256), key=lambda t: (-counts[t], t))[:13]                 # by hand: 270 - 257
    assert meta['vocab_size'] == 270 and meta['gpt2_ids'] == sorted([*range(256), *others, 50256])
    vocab = vocab_for_data_dir(str(out))
    for split, docs in (('train', DOCS[:4]), ('val', DOCS[4:] + ['Zebras gallop über Straßen.'])):
        ids = np.fromfile(out / f'{split}.bin', dtype=np.uint16)
        gpt2_ids = [t for d in docs for t in gpt2.encode_ordinary(d) + [50256]]
        assert ids.tolist() == vocab.from_gpt2(np.array(gpt2_ids)).tolist()
        assert vocab.decode(ids) == ''.join(d + '<|endoftext|>' for d in docs)              # lossless
        info = json.loads((out / 'meta.json').read_text())[split]
        assert info == {'tokens': len(ids), 'documents': len(docs), 'gpt2_tokens': len(gpt2_ids)}
        assert re.search(rf"{split}: {len(gpt2_ids):,} GPT-2 tokens -> {len(ids):,} tokens", p.stdout)
    assert 'they cover' in p.stdout and 'only' not in p.stdout


def test_vocab_larger_than_train_keeps_what_occurs(tmp_path, gpt2):
    src = tmp_path / 'all.txt'
    write_docs(src, DOCS)
    p = prepare('tinystories', '--input', src, '--out-dir', tmp_path / 'out', '--val-fraction', 0.3, '--vocab', 4096)
    meta = json.loads((tmp_path / 'out' / 'meta.json').read_text())
    kept = meta['vocab_size']
    assert kept < 300 and meta['vocab_requested'] == 4096
    assert f"vocab_size {kept:,} instead of 4,096" in p.stdout
    assert 'cover 100.00%' in p.stdout


def test_gpt2_run_removes_a_stale_meta_pkl(tmp_path, gpt2):
    src = tmp_path / 'all.txt'
    write_docs(src, DOCS)
    out = tmp_path / 'out'
    prepare('tinystories', '--input', src, '--out-dir', out, '--val-fraction', 0.3, '--vocab', 300)
    p = prepare('tinystories', '--input', src, '--out-dir', out, '--val-fraction', 0.3)
    assert 'removed' in p.stdout and not (out / 'meta.pkl').exists()     # else readers take GPT-2 ids for compact


@pytest.mark.parametrize('n', [100, 256, 50258, -1])
def test_bad_vocab_is_one_line(n):
    p = prepare('openwebtext', '--input', 'nothing-read-first.txt', '--vocab', n, check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    assert p.stderr.strip() == (f"error: --vocab must be 0 (GPT-2's own 50257 tokens) or between 257 "
                                f"(the 256 byte tokens and <|endoftext|>) and 50257, got {n}")
    assert not os.path.exists(os.path.join(REPO, 'data', f'openwebtext_v{n}'))


def test_default_out_dir():
    assert default_out_dir('/r/data/tinystories', 0) == '/r/data/tinystories'
    assert default_out_dir('/r/data/tinystories', 4096) == '/r/data/tinystories_v4096'


def test_count_and_remap_in_chunks(tmp_path, monkeypatch, gpt2):
    from dataset import Vocab
    ids = np.array(gpt2.encode_ordinary(' '.join(DOCS)) * 3, dtype=np.uint16)
    ids.tofile(tmp_path / 'g.bin')
    monkeypatch.setattr(prepare_common, 'CHUNK', 7)                  # chunks end inside words and characters
    assert np.array_equal(count_tokens(str(tmp_path / 'g.bin')), np.bincount(ids, minlength=50257))
    vocab = Vocab(list(range(256)) + [50256])                          # bytes only: every token expands
    n = remap_file(str(tmp_path / 'g.bin'), str(tmp_path / 'c.bin'), vocab.from_gpt2)
    out = np.fromfile(tmp_path / 'c.bin', dtype=np.uint16)
    assert n == len(out) == len(' '.join(DOCS).encode()) * 3
    assert np.array_equal(out, vocab.from_gpt2(ids))


def test_interrupted_vocab_run_leaves_nothing(tmp_path, gpt2):
    def val_docs():
        yield DOCS[4]
        raise KeyboardInterrupt                                         # Ctrl-C while val is tokenized
    out = tmp_path / 'out'
    args = argparse.Namespace(out_dir=str(out), vocab=300, num_proc=1)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(args, {'train': (DOCS[:4], 4), 'val': (val_docs(), 2)}, {})
    assert os.listdir(out) == []                                        # train was done, but nothing is final
