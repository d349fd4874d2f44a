"""The compact vocabulary: dataset.Vocab (byte fallback, round trips), read_meta (safe unpickling, clear
errors), the kept-set choice, and prepare.py --vocab on the shared TinyStories sample."""

import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, SHARED, run_script
from dataset import GPT2_EOT, Vocab, byte_tokens, open_data, prepare_command, read_meta, vocab_for_data_dir

sys.path.insert(0, os.path.join(REPO, 'data'))
from prepare_common import choose_kept  # noqa: E402

CAT, CAFE = 3797, 40304          # GPT-2's tokens ' cat' and ' café' (b' caf\xc3\xa9'), checked below


# -----------------------------------------------------------------------------
# pure pieces, by hand


def test_byte_tokens_are_gpt2_ids_0_to_255_not_in_byte_order(gpt2):
    ids = byte_tokens(gpt2)
    assert sorted(ids) == list(range(256))
    # GPT-2's byte-to-unicode table lists the printable bytes 33-126, 161-172, 174-255 first (ids 0-187),
    # then the others in byte order (0-32 -> 188-220, 127-160 -> 221-254, 173 -> 255)
    assert ids[ord('!')] == 0 and ids[ord('A')] == 32 and ids[ord('c')] == 66
    assert ids[0xA9] == 94 + (0xA9 - 161) == 102 and ids[0xC3] == 94 + 12 + (0xC3 - 174) == 127
    assert ids[0] == 188 and ids[ord(' ')] == 220 and ids[127] == 221 and ids[173] == 255
    assert all(gpt2.decode_single_token_bytes(t) == bytes([b]) for b, t in enumerate(ids))


def test_choose_kept_by_hand():
    counts = np.zeros(50257, dtype=np.int64)
    counts[[3, 300, 400, 500, 600, 50256]] = [100, 5, 5, 7, 1, 9]   # 3 is a byte token: kept anyway
    forced = list(range(256)) + [50256]
    assert choose_kept(counts, 257, forced) == forced                       # room for nothing else
    assert choose_kept(counts, 259, forced) == list(range(256)) + [300, 500, 50256]   # 500 (7), then the tie to 300
    assert choose_kept(counts, 260, forced) == list(range(256)) + [300, 400, 500, 50256]
    # only 4 other ids occur: 261 come back, never an id that does not occur
    assert choose_kept(counts, 4096, forced) == list(range(256)) + [300, 400, 500, 600, 50256]


def test_byte_fallback_by_hand(gpt2):
    assert gpt2.encode_ordinary(' cat café') == [CAT, CAFE]
    assert gpt2.decode_single_token_bytes(CAFE) == b' caf\xc3\xa9'
    v = Vocab(list(range(256)) + [CAT, GPT2_EOT])    # a tiny kept set: the bytes, ' cat' and end-of-text
    assert (v.vocab_size, v.eot_token) == (258, 257)
    # compact ids are the kept GPT-2 ids in ascending order: bytes keep their GPT-2 ids, ' cat' is 256.
    # ' café' is not kept: ' ' c a f, and é as its two UTF-8 bytes C3 A9
    ids = v.encode(' cat café')
    assert ids == [256, 220, 66, 64, 69, 127, 102]
    assert v.decode(ids) == ' cat café'
    assert v.decode(ids[:-1]) == ' cat caf\ufffd'                # half a character is no character
    assert v.from_gpt2(np.array([CAFE, CAT], dtype=np.uint16)).tolist() == [220, 66, 64, 69, 127, 102, 256]
    assert v.from_gpt2(np.array([], dtype=np.uint16)).tolist() == []
    assert v.encode('<|endoftext|>') == [ord(c) - 33 for c in '<|endoftext|>']   # plain text: its byte tokens
    assert v.encode('<|endoftext|>', allow_eot=True) == [257]
    with pytest.raises(ValueError, match='0..257'):
        v.decode([258])


def test_gpt2_vocab_is_gpt2(gpt2):
    v = Vocab(None)
    text = 'Once upon a time, Lily saw a café. <|endoftext|> 日本'
    assert v.vocab_size == 50257 and v.eot_token == 50256
    assert v.encode(text) == gpt2.encode_ordinary(text)
    assert v.decode(v.encode(text)) == text


def test_round_trip_and_chunking_on_varied_text(gpt2):
    v = Vocab(sorted(set(range(256)) | {GPT2_EOT} | set(range(256, 50256, 7))))   # every 7th token kept
    text = 'Ünïcødé, emoji 🐈 and CJK 猫 mixed with plain words: the cat sat on the mat. ' * 3
    ids = np.array(gpt2.encode_ordinary(text), dtype=np.int64)
    assert v.decode(v.encode(text)) == text
    whole = v.from_gpt2(ids)
    assert np.array_equal(whole, np.concatenate([v.from_gpt2(ids[:11]), v.from_gpt2(ids[11:])]))  # any cut
    assert len(whole) > len(ids) and whole.max() < v.vocab_size


def test_vocab_needs_byte_tokens_and_eot():
    with pytest.raises(ValueError, match='lacks the byte or end-of-text tokens \\[7\\]'):
        Vocab([t for t in range(256) if t != 7] + [GPT2_EOT])
    with pytest.raises(ValueError, match=r'\[50256\]'):
        Vocab(list(range(300)))
    with pytest.raises(ValueError, match='repeats'):
        Vocab(list(range(256)) + [GPT2_EOT, 5])


# -----------------------------------------------------------------------------
# meta.pkl: read safely, fail clearly


def write_pickle(path, obj) -> str:
    with open(path, 'wb') as f:
        pickle.dump(obj, f)
    return str(path)


META = {'vocab_size': 258, 'gpt2_ids': list(range(256)) + [CAT, GPT2_EOT], 'tokenizer': 'gpt2', 'eot_token': 257}


def test_read_meta_and_vocab_for_data_dir(tmp_path, gpt2):
    assert vocab_for_data_dir(str(tmp_path)).vocab_size == 50257                 # no meta.pkl: GPT-2
    write_pickle(tmp_path / 'meta.pkl', META)
    assert read_meta(str(tmp_path / 'meta.pkl')) == META
    v = vocab_for_data_dir(str(tmp_path))
    assert (v.vocab_size, v.eot_token, v.encode(' cat')) == (258, 257, [256])


def one_line_error(exc_type, fn, *args) -> str:
    with pytest.raises(exc_type) as e:
        fn(*args)
    msg = str(e.value)
    assert '\n' not in msg and 'prepare.py' in msg             # one line that names the fix
    return msg


def test_read_meta_missing_corrupt_inconsistent(tmp_path):
    path = str(tmp_path / 'meta.pkl')
    assert path in one_line_error(FileNotFoundError, read_meta, path)
    whole = pickle.dumps(META)
    for broken in (b'', whole[:len(whole) // 2], b'not a pickle at all\n' * 3):
        with open(path, 'wb') as f:
            f.write(broken)
        msg = one_line_error(ValueError, read_meta, path)
        assert msg.startswith(f'{path} is corrupt or truncated')
    for bad, says in (([1, 2], 'holds a list'), ({**META, 'vocab_size': 4096}, '258 entries but vocab_size is 4096'),
                      ({'vocab_size': 3}, 'gpt2_ids must be a list'), ({**META, 'vocab_size': True}, 'must be an int'),
                      ({**META, 'gpt2_ids': META['gpt2_ids'][:-1] + [50257]}, 'must lie in 0..50256'),
                      ({**META, 'gpt2_ids': META['gpt2_ids'][:-1] + [5]}, 'repeats 1')):
        write_pickle(path, bad)
        assert says in one_line_error(ValueError, read_meta, path)
    write_pickle(path, {**META, 'gpt2_ids': list(range(258))})         # consistent, but no end-of-text token
    assert 'lacks the byte or end-of-text' in one_line_error(ValueError, vocab_for_data_dir, str(tmp_path))


class Touch:
    """Unpickling this would call fn(*args): os.system('touch ...') or open(marker, 'w')."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize('how', ['os.system', 'open', 'nested'])
def test_read_meta_refuses_code_and_runs_none(tmp_path, how):
    marker = tmp_path / 'MARKER'
    evil = Touch(os.system, f'touch {marker}') if how == 'os.system' else Touch(open, str(marker), 'w')
    obj = {**META, 'note': [evil]} if how == 'nested' else evil     # hidden inside a valid-looking dict, too
    path = write_pickle(tmp_path / 'meta.pkl', obj)
    msg = one_line_error(ValueError, read_meta, path)
    assert msg.startswith(f"{path} is not a plain meta.pkl written by this repo's prepare.py")
    assert ('system' if how == 'os.system' else 'open') in msg
    assert not marker.exists()
    with pytest.raises(ValueError):
        vocab_for_data_dir(str(tmp_path))
    assert not marker.exists()
    pickle.loads((tmp_path / 'meta.pkl').read_bytes())      # the file is really unsafe: plain pickle runs it
    assert marker.exists()


# -----------------------------------------------------------------------------
# prepare.py --vocab 4096 on the shared TinyStories sample, against the GPT-2 files


def prepare(*args) -> subprocess.CompletedProcess:
    """python data/tinystories/prepare.py ARGS, inside this process (conftest.run_script)."""
    return run_script('data/tinystories/prepare.py', args)


@pytest.fixture(scope='module')
def sample(tmp_path_factory, gpt2):
    """The shared sample prepared twice, once per vocabulary: (gpt2_dir, v4096_dir, stdout of --vocab 4096)."""
    src = os.path.join(SHARED, 'data', 'tinystories')
    if not os.path.isfile(os.path.join(src, 'train.txt')):
        pytest.skip('../shared/data is not here')
    root = tmp_path_factory.mktemp('sample')
    files = ['--input', os.path.join(src, 'train.txt'), '--val-input', os.path.join(src, 'val.txt'), '--num-proc', 2]
    prepare(*files, '--out-dir', root / 'gpt2')
    p = prepare(*files, '--vocab', 4096, '--out-dir', root / 'v4096')
    return root / 'gpt2', root / 'v4096', p.stdout


def test_sample_round_trip(sample, gpt2):
    gpt2_dir, v_dir, _ = sample
    vocab = vocab_for_data_dir(str(v_dir))
    gpt2_val = np.fromfile(gpt2_dir / 'val.bin', dtype=np.uint16)
    val = np.fromfile(v_dir / 'val.bin', dtype=np.uint16)
    text = gpt2.decode(gpt2_val.tolist())
    assert vocab.decode(val) == text                                   # lossless
    with open(os.path.join(SHARED, 'data', 'tinystories', 'val.txt'), encoding='utf-8') as f:
        assert text == f.read().replace('\n<|endoftext|>\n', '<|endoftext|>')
    assert any(ord(c) > 127 for c in text)                             # multi-byte characters are in it
    outside = ~np.isin(gpt2_val, vocab.gpt2_ids)
    assert outside.sum() > 100                                         # ... and the byte fallback is used
    assert np.array_equal(val, vocab.from_gpt2(gpt2_val)) and len(val) > len(gpt2_val)
    assert np.fromfile(v_dir / 'train.bin', dtype=np.uint16).max() == vocab.vocab_size - 1 == vocab.eot_token


def test_sample_meta_and_report(sample):
    gpt2_dir, v_dir, stdout = sample
    assert sorted(os.listdir(v_dir)) == ['meta.json', 'meta.pkl', 'train.bin', 'val.bin']   # no temporaries
    assert 'meta.pkl' not in os.listdir(gpt2_dir)
    meta = read_meta(str(v_dir / 'meta.pkl'))
    ids = meta['gpt2_ids']
    assert meta['vocab_size'] == 4096 and ids == sorted(ids) and ids[:256] == list(range(256)) and ids[-1] == 50256
    assert meta['eot_token'] == 4095 and meta['tokenizer'] == 'gpt2'
    info = json.loads((v_dir / 'meta.json').read_text())
    share = float(re.search(r'they cover (\d+\.\d+)% of train', stdout).group(1)) / 100
    assert 0.98 < share < 0.999 and abs(share - info['kept_share_of_train']) < 1e-4
    assert 10_000 < info['train_distinct_gpt2_tokens'] < 11_000
    for split in ('train', 'val'):
        gpt2_tokens = json.loads((gpt2_dir / 'meta.json').read_text())[split]['tokens']
        assert info[split]['gpt2_tokens'] == gpt2_tokens
        assert info[split]['tokens'] == os.path.getsize(v_dir / f'{split}.bin') // 2
        growth = float(re.search(rf'{split}: [\d,]+ GPT-2 tokens -> [\d,]+ tokens \((\d\.\d+)x\)', stdout).group(1))
        assert 1.0 < growth < 1.1 and abs(growth - info[split]['tokens'] / gpt2_tokens) < 1e-4


def test_prepare_command_names_the_script_that_writes_a_dataset(tmp_path):
    assert prepare_command('tinystories') == 'python data/tinystories/prepare.py'
    assert prepare_command('tinystories_v4096') == 'python data/tinystories/prepare.py --vocab 4096'
    with pytest.raises(FileNotFoundError, match='run python data/openwebtext/prepare.py --vocab 8192 '):
        open_data(str(tmp_path), 'openwebtext_v8192', 16)


# -----------------------------------------------------------------------------
# train.py, sample.py and compare.py on a compact vocabulary

TINY = ['--device=cpu', '--compile=False', '--n_layer=2', '--n_embd=32', '--n_head=2', '--block_size=32',
        '--batch_size=4', '--eval_iters=2', '--log_interval=5', '--warmup_iters=2', '--lr_decay_iters=10']


def script(*args, check=True) -> subprocess.CompletedProcess:
    """python SCRIPT ARGS, inside this process (conftest.run_script)."""
    return run_script(args[0], args[1:], check=check)


def test_train_takes_vocab_size_from_meta_and_sample_decodes_through_it(sample, tmp_path):
    _, v_dir, _ = sample
    out = tmp_path / 'run'
    p = script('train.py', 'config/deepseek_moe.py', *TINY, f'--data_dir={v_dir}', f'--out_dir={out}',
               '--max_iters=10', '--eval_interval=10')
    assert f"vocab_size 4096 (from meta.pkl): {v_dir / 'meta.pkl'} holds a compact vocabulary of 4,096 tokens" in p.stdout
    rows = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    assert rows[0]['model_args']['vocab_size'] == 4096 and rows[0]['config']['vocab_size'] == 4096
    assert rows[0]['data_vocab_size'] == 4096
    import torch
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['data']['gpt2_ids'] == read_meta(str(v_dir / 'meta.pkl'))['gpt2_ids']
    # sample.py needs no flag: the checkpoint knows its vocabulary; the prompt comes back exactly
    p = script('sample.py', f'--out_dir={out}', '--device=cpu', '--start=Once upon a time, Zoë', '--num_samples=1',
               '--max_new_tokens=20')
    # the same generation here, decoded through the checkpoint's vocabulary: sample.py printed exactly that
    from model import load_checkpoint
    model, _ = load_checkpoint(str(out / 'ckpt.pt'))
    vocab = Vocab(ckpt['data']['gpt2_ids'])
    prompt = vocab.encode('Once upon a time, Zoë', allow_eot=True)
    torch.manual_seed(1337)
    y = model.generate(torch.tensor([prompt]), 20, temperature=0.8, top_k=200, n_tokens=vocab.vocab_size)
    assert p.stdout == 'Once upon a time, Zoë' + vocab.decode(y[0, len(prompt):].tolist()) + '\n---------------\n'
    assert vocab.decode(prompt) == 'Once upon a time, Zoë'
    # compare.py --routing reads the run's own validation data (from the checkpoint) and labels tokens through
    # its vocabulary: every listed token is one compact id's text
    script('compare.py', '--routing', out, '--text', 'Once upon a time, Zoë', '--out', tmp_path / 'cmp',
           '--val-tokens', 2000)
    top = (tmp_path / 'cmp' / 'top_tokens.md').read_text()
    rows = [line for line in top.splitlines() if re.match(r'\| \d+ \|', line)]
    assert len(rows) == 30 and sum(int(r.split('|')[2].replace(',', '')) for r in rows) == (2000 // 32) * 32 * 6
    vocab = vocab_for_data_dir(str(v_dir))
    shown = {eval(t) for t in re.findall(r"`('[^`]*')`", top)}
    texts = {vocab.decode([i]) for i in range(vocab.vocab_size)}
    assert shown and shown <= texts, shown - texts
    # a resume keeps the checkpoint's vocabulary and says so
    p = script('train.py', f'--out_dir={out}', '--init_from=resume', '--max_iters=12', '--eval_interval=2')
    assert "vocab_size 4096 (the checkpoint's)" in p.stdout


def test_a_vocab_size_smaller_than_the_data_is_one_line(sample, tmp_path):
    _, v_dir, _ = sample
    p = script('train.py', 'config/dense.py', *TINY, f'--data_dir={v_dir}', f'--out_dir={tmp_path / "x"}',
               '--vocab_size=1000', check=False)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and 'Traceback' not in p.stderr
    assert 'vocab_size=1000 is smaller than the data needs: it holds token ids up to 4095; use --vocab_size=4096' in p.stderr
    p = script('train.py', 'config/dense.py', *TINY, f'--data_dir={v_dir}', f'--out_dir={tmp_path / "y"}',
               '--vocab_size=4160', '--max_iters=2', '--eval_interval=2')     # padded beyond it: fine, and said
    assert 'vocab_size 4160 (as given)' in p.stdout


def test_bpe_files_missing_is_one_clear_error(monkeypatch):
    """Without internet and without TIKTOKEN_CACHE_DIR, tiktoken fails deep in requests; Vocab (sample.py,
    compare.py --routing, prepare.py) says in one line what to do instead."""
    import tiktoken

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', '/nowhere')
    with pytest.raises(FileNotFoundError) as e:
        Vocab()
    message = str(e.value)
    assert "GPT-2's BPE files could not be loaded (ConnectionError, TIKTOKEN_CACHE_DIR=/nowhere)" in message
    assert 'set TIKTOKEN_CACHE_DIR' in message and '\n' not in message
