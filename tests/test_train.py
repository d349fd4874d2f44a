"""train.py and sample.py as a user runs them, on tiny models and tiny data, on the CPU: inside this process
(conftest.run_script), on the session's shared runs where a test only reads or continues one (copied first), and
as real processes where the process boundary is the point (exit codes, stderr, SIGKILL, torchrun)."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, SHARED, TINY, copy_run, random_token_data, run_script, subprocess_env as env
from configurator import configure
from model import GPT, GPTConfig, load_checkpoint
from moe import max_vio
from dataset import windows
from train import DEFAULTS, all_finite, check_settings, duration, get_lr, load_optimizer_state, resume_settings, sampler

def run(args: list[str], check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def metrics(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def evals(out_dir) -> list[dict]:
    return [r for r in metrics(out_dir) if r['type'] == 'eval']


# -----------------------------------------------------------------------------
# pure pieces


def test_get_lr_by_hand():
    args = dict(learning_rate=1.0, warmup_iters=9, lr_decay_iters=109, min_lr=0.1)
    assert get_lr(0, **args) == pytest.approx(0.1)            # (0+1)/(9+1)
    assert get_lr(8, **args) == pytest.approx(0.9)
    assert get_lr(9, **args) == pytest.approx(1.0)            # warmup done: the peak
    assert get_lr(59, **args) == pytest.approx(0.55)          # halfway through the cosine: (1 + 0.1) / 2
    assert get_lr(109, **args) == pytest.approx(0.1)
    assert get_lr(500, **args) == pytest.approx(0.1)          # floor after the decay


def test_bias_update_scale_by_hand():
    from train import bias_update_scale
    assert bias_update_scale('constant', 500, 1e-4, 1e-3, 50) == 1.0
    assert bias_update_scale('lr', 10, 2e-4, 1e-3, 50) == 1.0            # full strength through the warmup
    assert bias_update_scale('lr', 500, 5e-4, 1e-3, 50) == pytest.approx(0.5)   # then the LR's decay
    assert bias_update_scale('lr', 5000, 1e-4, 1e-3, 50) == pytest.approx(0.1)


def test_duration_for_people():
    assert [duration(s) for s in (0.4, 45, 750, 12_000, 425_000)] == ['0s', '45s', '12m30s', '3h20m', '4d22h']


def test_get_lr_never_divides_by_zero():
    # warmup == decay (the default warmup 200 with --lr_decay_iters=200) and warmup > decay
    for warmup, decay in ((200, 200), (300, 200), (0, 0)):
        lrs = [get_lr(it, 1.0, warmup, decay, 0.1) for it in range(0, 400)]
        assert all(0.0 < lr <= 1.0 for lr in lrs)
        assert lrs[-1] == 0.1


@pytest.mark.parametrize('change, message', [
    (dict(warmup_iters=200, lr_decay_iters=200), 'warmup_iters=200 must be smaller than lr_decay_iters=200'),
    (dict(batch_size=0), 'batch_size=0 must be >= 1'),
    (dict(gradient_accumulation_steps=-1), 'gradient_accumulation_steps=-1 must be >= 1'),
    (dict(eval_iters=0), 'eval_iters=0 must be >= 1'),
    (dict(eval_interval=0), 'eval_interval=0 must be >= 1'),
    (dict(max_iters=-5), 'max_iters=-5 must be >= 0'),
    (dict(learning_rate=0.0), 'learning_rate=0.0 must be > 0'),
    (dict(beta2=1.0), 'beta2=1.0 must be in'),
    (dict(init_from='resum'), "init_from must be 'scratch' or 'resume'"),
    (dict(bias_update_schedule='cosine'), "bias_update_schedule must be 'constant' or 'lr'"),
])
def test_check_settings_names_the_problem(change, message):
    check_settings(DEFAULTS)                                      # the defaults are fine
    check_settings({**DEFAULTS, 'decay_lr': False, 'warmup_iters': 900})   # no decay: any warmup
    with pytest.raises(ValueError, match=re.escape(message)):
        check_settings({**DEFAULTS, **change})


@pytest.mark.parametrize('bad, message', [
    (dict(n_embd=0, n_head=1), 'n_embd=0 must be >= 1'), (dict(n_layer=0), 'n_layer=0 must be >= 1'),
    (dict(block_size=0), 'block_size=0 must be >= 1'), (dict(dropout=1.0), 'dropout=1.0 must be in'),
])
def test_model_sizes_are_checked(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GPTConfig(**bad)


def test_resume_settings_start_from_the_checkpoint():
    saved = configure(DEFAULTS, ['config/tinystories_cpu.py', 'config/deepseek_moe.py'])
    model_args = {k: saved[k] for k in ('n_embd', 'expert_hidden', 'n_experts', 'ffn_type', 'n_layer')}
    # nothing given: the run as it was, in the directory the checkpoint was found in
    s = resume_settings(saved, model_args, ['--init_from=resume'], 'runs/x')
    assert {k: v for k, v in s.items() if k not in ('init_from', 'out_dir')} == \
        {k: v for k, v in saved.items() if k not in ('init_from', 'out_dir')}
    assert s['out_dir'] == 'runs/x' and s['expert_hidden'] == 64 and s['max_iters'] == 1000
    # what is given now wins, config files included (which derive widths from the checkpoint's n_embd)
    s = resume_settings(saved, model_args, ['config/deepseek_moe.py', '--bias_update_speed=0.0', '--weight_decay=0',
                                            '--max_iters=900'], 'runs/x')
    assert (s['bias_update_speed'], s['weight_decay'], s['max_iters'], s['expert_hidden']) == (0.0, 0.0, 900, 64)
    # a setting that changes the weights' shapes stops, naming both values
    with pytest.raises(ValueError, match=r"n_embd=256 differs from the checkpoint's n_embd=128"):
        resume_settings(saved, model_args, ['--n_embd=256'], 'runs/x')
    with pytest.raises(ValueError, match=r"ffn_type='moe' differs from the checkpoint's ffn_type='deepseek_moe'"):
        resume_settings(saved, model_args, ['config/moe.py'], 'runs/x')
    # a checkpoint of an older version: unknown settings are dropped, missing ones take the defaults
    s = resume_settings({**saved, 'no_longer_a_setting': 1}, model_args, [], 'runs/x')
    assert 'no_longer_a_setting' not in s


def test_load_optimizer_state_keeps_the_state_and_takes_the_new_hyperparameters():
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16, ffn_hidden=32))
    old = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    x = torch.randint(0, 64, (2, 8))
    model(x, x)[1].backward()
    old.step()
    new = model.configure_optimizers(0.0, 1e-3, (0.8, 0.99), 'cpu')
    load_optimizer_state(new, old.state_dict())
    assert [g['weight_decay'] for g in new.param_groups] == [0.0, 0.0]
    assert all(g['betas'] == (0.8, 0.99) for g in new.param_groups)
    p = model.lm_head.weight
    torch.testing.assert_close(new.state[p]['exp_avg'], old.state[p]['exp_avg'])
    assert new.state[p]['step'].item() == 1


def test_all_finite():
    assert all_finite([torch.ones(3), torch.zeros(2, 2)])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, float('nan')])])
    assert not all_finite([torch.tensor([float('inf')])])


def test_sampler_is_a_function_of_seed_rank_and_iteration():
    data = np.arange(1000, dtype=np.uint16)
    a = windows(data, sampler(1, 0, 7).integers(0, 900, size=4), 16)
    b = windows(data, sampler(1, 0, 7).integers(0, 900, size=4), 16)
    c = windows(data, sampler(1, 1, 7).integers(0, 900, size=4), 16)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.equal(a[1], a[0] + 1)                         # targets are inputs shifted by one


def test_configurator(tmp_path):
    s = configure(DEFAULTS, ['config/moe.py', '--top_k=1', '--learning_rate=1', '--out_dir=out-x'])
    assert s['ffn_type'] == 'moe' and s['top_k'] == 1 and s['out_dir'] == 'out-x'
    assert s['learning_rate'] == 1.0 and type(s['learning_rate']) is float      # int accepted for a float
    assert s['expert_hidden'] == 2 * DEFAULTS['n_embd']
    # a size overlay before the FFN config scales the FFN widths
    overlay = tmp_path / 'size.py'
    overlay.write_text('n_embd = 64\n')
    assert configure(DEFAULTS, [str(overlay), 'config/deepseek_moe.py'])['expert_hidden'] == 32
    with pytest.raises(ValueError, match=re.escape("'compile' expects str (like 'auto') or bool, got int 1")):
        configure(DEFAULTS, ['--compile=1'])
    assert configure(DEFAULTS, ['--compile=False'])['compile'] is False        # 'auto' | True | False


@pytest.mark.parametrize('argv, key, value', [
    (['config/deepseek_moe.py', '--n_embd=256'], 'expert_hidden', 128),      # 256 // 2, not 384 // 2
    (['--n_embd=256', 'config/deepseek_moe.py'], 'expert_hidden', 128),      # wherever the flag stands
    (['config/moe.py', '--n_embd=256'], 'expert_hidden', 512),
    (['config/dense.py', '--n_embd=256'], 'ffn_hidden', 1024),
    (['config/tinystories_cpu.py', 'config/deepseek_moe.py', '--n_embd=256'], 'expert_hidden', 128),
    (['config/tinystories_cpu.py', 'config/deepseek_moe.py', '--n_embd=256'], 'n_embd', 256),
    (['config/dense.py', '--n_embd=64', '--n_embd=32'], 'ffn_hidden', 128),  # the last flag counts
])
def test_command_line_reaches_the_config_files(argv, key, value):
    assert configure(DEFAULTS, argv)[key] == value


def test_config_file_comprehensions_and_lambdas_see_the_file_s_own_values(tmp_path):
    f = tmp_path / 'derived.py'
    f.write_text('n_embd = 512\nffn_hidden = max(n_embd * 4 for _ in range(1))\n'
                 'expert_hidden = (lambda: n_embd // 2)()\nn_experts = [n_embd // 64 for _ in range(1)][0]\n')
    s = configure(DEFAULTS, [str(f)])
    assert (s['ffn_hidden'], s['expert_hidden'], s['n_experts']) == (2048, 256, 8)
    s = configure(DEFAULTS, [str(f), '--n_embd=64'])
    assert (s['ffn_hidden'], s['expert_hidden'], s['n_experts']) == (256, 32, 1)


def test_command_line_value_holds_inside_a_file_that_assigns_it(tmp_path):
    size = tmp_path / 'size.py'
    size.write_text('n_embd = 512\nffn_hidden = 4 * n_embd\nexpert_hidden = max(n_embd // 2 for _ in range(1))\n')
    s = configure(DEFAULTS, [str(size), '--n_embd=64'])
    assert (s['n_embd'], s['ffn_hidden'], s['expert_hidden']) == (64, 256, 32)
    assert configure(DEFAULTS, [str(size)])['ffn_hidden'] == 2048


def test_configurator_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown setting 'top_kk'; did you mean 'top_k'"):
        configure(DEFAULTS, ['--top_kk=2'])
    with pytest.raises(ValueError, match="'top_k' expects int"):
        configure(DEFAULTS, ['--top_k=two'])
    with pytest.raises(ValueError, match='not found'):
        configure(DEFAULTS, ['config/nope.py'])
    bad = tmp_path / 'bad.py'
    bad.write_text('n_expert = 4\n')
    with pytest.raises(ValueError, match="bad.py: unknown setting 'n_expert'; did you mean 'n_experts'"):
        configure(DEFAULTS, [str(bad)])


# -----------------------------------------------------------------------------
# training runs


@pytest.mark.parametrize('config', ['dense', 'moe', 'deepseek_moe'])
def test_short_run_of_each_config_lowers_val_loss(config, tiny_runs):
    out, stdout = tiny_runs[config]             # 60 iterations, evals at 0, 30 and 60 (conftest.tiny_runs)
    rows = metrics(out)
    assert rows[0]['type'] == 'config' and rows[0]['model_args']['ffn_type'] == config
    assert rows[0]['total_params'] >= rows[0]['active_params'] > 0
    ev = evals(out)
    assert [r['iter'] for r in ev] == [0, 30, 60]
    assert ev[-1]['val_loss'] < ev[0]['val_loss'] - 1.0, ev
    for key in ('iter', 'tokens', 'train_loss', 'val_loss', 'lr', 'elapsed_s', 'tokens_per_s'):
        assert key in ev[-1]
    assert ev[-1]['tokens'] == 60 * 8 * 32
    train_rows = [r for r in rows if r['type'] == 'train']
    assert [r['iter'] for r in train_rows] == list(range(5, 61, 5))
    if config == 'dense':
        assert 'expert_counts' not in ev[-1] and rows[-1]['type'] == 'eval'
    else:
        n_exp = 8 if config == 'moe' else 30
        k = 2 if config == 'moe' else 6
        assert len(ev[-1]['expert_counts']) == 2 and len(ev[-1]['expert_counts'][0]) == n_exp
        # the counts of the 30 steps since the last eval: every token-slot of every step
        assert sum(ev[-1]['expert_counts'][0]) == 30 * 8 * 32 * k
        assert len(ev[-1]['maxvio_batch']) == 2 and len(ev[-1]['dropped_frac']) == 2
        assert len(ev[-1]['maxvio_global']) == 2 and 'maxvio' not in ev[-1]
        assert (max(ev[-1]['dropped_frac']) > 0) == (config == 'moe')     # only moe has a capacity
        sel = rows[-1]
        assert sel['type'] == 'expert_selection' and sel['layers'] == [0, 1]
        assert [sum(c) for c in sel['counts']] == [8 * 32 * k] * 2
        assert 'maxvio_batch' in stdout and 'maxvio_global' in stdout
    assert re.search(r'^iter 60/60: loss [\d.]+, [\d.]+ ms/iter, [\d,]+ tok/s, eta 0s', stdout, re.M), stdout
    assert stdout.startswith('device cpu (') and rows[0]['runtime']['device'] == 'cpu'
    assert ('MoE dispatch' in stdout.splitlines()[0]) == (config != 'dense')
    assert rows[0]['model_args']['moe_dispatch'] == 'grouped' and rows[0]['config']['moe_dispatch'] == 'auto'
    model, ckpt = load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['iter_num'] == 60 and ckpt['config']['ffn_type'] == config


def test_real_tinystories_run_lowers_val_loss(tmp_path, gpt2):
    """The shared TinyStories sample, tokenized with GPT-2 BPE: a few dozen steps already help."""
    src = os.path.join(SHARED, 'data', 'tinystories')
    if not os.path.isdir(src):
        pytest.skip('../shared/data is not here')
    enc = gpt2
    rng = random.Random(0)
    for split, n in (('train', 400), ('val', 40)):
        with open(os.path.join(src, f'{split}.txt'), encoding='utf-8') as f:
            stories = f.read().split('\n<|endoftext|>\n')[:-1]
        ids = []
        for story in rng.sample(stories, n):                  # the files are grouped by source: sample
            ids += enc.encode_ordinary(story) + [enc.eot_token]
        np.array(ids, dtype=np.uint16).tofile(tmp_path / f'{split}.bin')
    args = [a for a in TINY if not a.startswith('--vocab_size')]
    run_script('train.py', ['config/deepseek_moe.py', *args, f'--data_dir={tmp_path}', f'--out_dir={tmp_path / "out"}',
                            '--max_iters=40', '--eval_interval=40', '--lr_decay_iters=40', '--n_embd=64',
                            '--learning_rate=1e-2'])
    ev = evals(tmp_path / 'out')
    assert ev[0]['val_loss'] == pytest.approx(np.log(50304), abs=0.2)   # uniform over the vocabulary at init
    assert ev[-1]['val_loss'] < ev[0]['val_loss'] - 2.0, ev


@pytest.mark.parametrize('config', ['moe', 'deepseek_moe'])
def test_resume_is_exact(config, data_dir, tmp_path):
    common = [f'config/{config}.py', *TINY, f'--data_dir={data_dir}', '--eval_interval=10', '--lr_decay_iters=30',
              '--dropout=0.1']
    run_script('train.py', [*common, f'--out_dir={tmp_path / "a"}', '--max_iters=30'])
    run_script('train.py', [*common, f'--out_dir={tmp_path / "b"}', '--max_iters=20', '--always_save_checkpoint=True'])
    # resumed as a user would, without repeating the config: every setting comes from the checkpoint
    run_script('train.py', [f'--out_dir={tmp_path / "b"}', '--max_iters=30', '--init_from=resume'])
    a, b = evals(tmp_path / 'a'), evals(tmp_path / 'b')
    assert [r['iter'] for r in b] == [0, 10, 20, 30]            # no duplicate eval at the resume point
    for ra, rb in zip(a, b):
        assert rb['val_loss'] == pytest.approx(ra['val_loss'], abs=1e-4)
        assert rb['train_loss'] == pytest.approx(ra['train_loss'], abs=1e-4)
    ma, _ = load_checkpoint(str(tmp_path / 'a' / 'ckpt.pt'))
    mb, _ = load_checkpoint(str(tmp_path / 'b' / 'ckpt.pt'))
    # on the CPU (one process, the same thread count) bit for bit: every weight and balancing bias equal
    for name, value in ma.state_dict().items():
        assert torch.equal(value, mb.state_dict()[name]), name
    if config == 'deepseek_moe':
        assert ma.moe_layers()[0].expert_bias.abs().sum() > 0


def test_resume_honours_the_settings_given_now(tiny_runs, tmp_path):
    out = copy_run(tiny_runs['deepseek_moe'][0], tmp_path)          # 60 iterations of config/deepseek_moe.py
    bias_before = [m.expert_bias.clone() for m in load_checkpoint(str(out / 'ckpt.pt'))[0].moe_layers()]
    assert all(b.abs().sum() > 0 for b in bias_before)              # gamma = 0.001 moved them
    run_script('train.py', [f'--out_dir={out}', '--max_iters=70', '--init_from=resume', '--bias_update_speed=0.0',
                            '--weight_decay=0.0', '--capacity_factor=1.5'])
    model, ckpt = load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['iter_num'] == 70
    for before, layer in zip(bias_before, model.moe_layers()):
        assert torch.equal(layer.expert_bias, before)                # gamma = 0: not moved since the resume
    assert [g['weight_decay'] for g in ckpt['optimizer']['param_groups']] == [0.0, 0.0]
    assert ckpt['config']['weight_decay'] == 0.0 and ckpt['model_args']['capacity_factor'] == 1.5
    first, resumed = [r for r in metrics(out) if r['type'] == 'config']
    assert resumed['iter'] == 60 and resumed['config']['bias_update_speed'] == 0.0
    assert first['config_files'] == resumed['config_files'] == ['config/deepseek_moe.py']
    assert resumed['model_args']['bias_update_speed'] == 0.0 and resumed['model_args']['capacity_factor'] == 1.5
    # changing the model's shape on resume: one line naming the setting and both values; checkpoint kept
    before = (out / 'ckpt.pt').read_bytes()
    p = run_script('train.py', [f'--out_dir={out}', '--init_from=resume', '--max_iters=80', '--n_embd=64'], check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "n_embd=64 differs from the checkpoint's n_embd=32" in p.stderr
    assert (out / 'ckpt.pt').read_bytes() == before


def test_an_eval_only_look_changes_nothing(tiny_runs, tmp_path):
    """--eval_only on a finished run evaluates and leaves the checkpoint alone, so the run can still be extended."""
    out = copy_run(tiny_runs['dense'][0], tmp_path)                 # 60 iterations, evals at 0, 30, 60
    before = (out / 'ckpt.pt').read_bytes()
    p = run_script('train.py', [f'--out_dir={out}', '--init_from=resume', '--eval_only=True'])
    assert 'eval 60:' in p.stdout and (out / 'ckpt.pt').read_bytes() == before
    run_script('train.py', [f'--out_dir={out}', '--init_from=resume', '--max_iters=70'])
    assert [r['iter'] for r in evals(out)] == [0, 30, 60, 60, 70]      # the look, then the run goes on
    assert load_checkpoint(str(out / 'ckpt.pt'))[1]['iter_num'] == 70


def test_float16_loss_scale_is_saved_and_resumed(data_dir, tmp_path):
    """The GradScaler's state (scale, steps since it last changed) continues across a resume exactly as in an
    uninterrupted run; a fresh scaler would restart its growth count at 0."""
    common = ['config/moe.py', *TINY, f'--data_dir={data_dir}', '--eval_interval=6', '--lr_decay_iters=12',
              '--dtype=float16']
    run_script('train.py', [*common, f'--out_dir={tmp_path / "straight"}', '--max_iters=8'])
    out = tmp_path / 'out'
    run_script('train.py', [*common, f'--out_dir={out}', '--max_iters=6'])
    assert torch.load(out / 'ckpt.pt', weights_only=True)['scaler']['scale'] > 0
    p = run_script('train.py', [f'--out_dir={out}', '--init_from=resume', '--max_iters=8'])
    assert 'float16 + GradScaler' in p.stdout
    resumed = torch.load(out / 'ckpt.pt', weights_only=True)['scaler']
    straight = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=True)['scaler']
    assert resumed == straight and resumed['_growth_tracker'] > 2


def test_maxvio_batch_and_global_as_the_papers_define_them(data_dir, tmp_path):
    out = tmp_path / 'out'
    run_script('train.py', ['config/moe.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=10',
                            '--eval_interval=5', '--lr_decay_iters=10', '--log_interval=1'])
    rows = metrics(out)
    train = {r['iter']: r for r in rows if r['type'] == 'train'}
    ev = evals(out)
    assert 'maxvio_batch' not in ev[0] and len(ev[0]['maxvio_global']) == 2      # iter 0: no step yet
    for e, steps in ((ev[1], range(1, 6)), (ev[2], range(6, 11))):
        for layer in range(2):
            # eval rows: the mean over the steps since the last eval of each step's own MaxVio
            per_step = [train[i]['maxvio_batch'][layer] for i in steps]
            assert e['maxvio_batch'][layer] == pytest.approx(np.mean(per_step), abs=2e-4)
            # every token-slot of those steps: 5 steps of 8 x 32 tokens, top-2
            assert sum(e['expert_counts'][layer]) == 5 * 8 * 32 * 2
            # MaxVio_global: on the validation batches of this eval, every token-slot counted
            counts = torch.tensor(e['val_expert_counts'][layer])
            assert counts.sum().item() == 4 * 8 * 32 * 2
            assert e['maxvio_global'][layer] == pytest.approx(max_vio(counts).item(), abs=1e-4)
    # an eval after every step: each eval row's expert_counts are exactly one step's, so its maxvio_batch must be
    # their MaxVio (computed here from the logged counts, independently of train.py)
    out1 = tmp_path / 'every'
    run_script('train.py', ['config/moe.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out1}', '--max_iters=6',
                            '--eval_interval=1', '--eval_iters=1', '--lr_decay_iters=10', '--log_interval=1'])
    per_step = [e for e in evals(out1) if 'maxvio_batch' in e]
    assert len(per_step) == 6
    for e in per_step:
        for layer in range(2):
            step = max_vio(torch.tensor(e['expert_counts'][layer])).item()
            assert e['maxvio_batch'][layer] == pytest.approx(step, abs=1e-4)


# resuming the shared dense run (60 iterations) with a learning rate that blows the weights up at its first update
BLOW_UP = ['--init_from=resume', '--learning_rate=1e30', '--warmup_iters=0', '--decay_lr=False', '--grad_clip=0',
           '--always_save_checkpoint=True']


def test_diverged_eval_never_replaces_a_good_checkpoint(tiny_runs, tmp_path):
    """The step before the eval has a finite loss, and its update (lr 1e30) blows the weights up: the eval
    then sees NaN. Saving that (always_save_checkpoint) would replace the good checkpoint."""
    out = copy_run(tiny_runs['dense'][0], tmp_path)
    before = (out / 'ckpt.pt').read_bytes()
    p = run_script('train.py', [f'--out_dir={out}', *BLOW_UP, '--max_iters=61', '--eval_interval=1'], check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr
    assert 'non-finite loss at the evaluation of iteration 61' in p.stderr and 'nothing was saved' in p.stderr
    assert (out / 'ckpt.pt').read_bytes() == before
    model, ckpt = load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['iter_num'] == 60 and all_finite(model.state_dict().values())


def test_float64_run_uses_the_expert_loop(data_dir, tmp_path):
    out = tmp_path / 'out'
    run_script('train.py', ['config/moe.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=4',
                            '--eval_interval=4', '--lr_decay_iters=8', '--dtype=float64'])
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['model']['lm_head.weight'].dtype == torch.float64
    assert np.isfinite(evals(out)[-1]['val_loss'])


def test_a_run_that_would_take_hours_on_the_cpu_says_so_early(data_dir, tmp_path):
    """After the first timed iterations: one line with the whole run's time, and where a run off the GPU
    would take more than an hour, the pointer to config/tinystories_cpu.py (here: 10 million tiny steps).
    train.py's print is replaced by one that stops the run at that line."""
    class Enough(Exception):
        pass
    lines = []

    def record(*args, **kwargs):
        lines.append(' '.join(map(str, args)))
        if lines[-1].startswith('timing:') or len(lines) > 20:
            raise Enough
    with pytest.raises(Enough):
        run_script('train.py', ['config/moe.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path / "out"}',
                                '--max_iters=10000000', '--lr_decay_iters=10000000', '--eval_interval=1000000'],
                   init_globals={'print': record})
    # 10 million steps of ~0.01 s are about a day: either format may come (one clean-clone run printed 23h43m)
    assert re.match(r'timing: [\d.]+ s/iter over 3 iterations: about (\d+d\d\dh|\d+h\d\dm) for the 9,999,996 iterations left '
                    r'and their evals\. This config is sized for a GPU; on a CPU, put config/tinystories_cpu\.py first',
                    lines[-1]), lines


def test_train_py_as_a_process_one_line_errors_and_sigkill(data_dir, tmp_path):
    """The process boundary, once: a user error exits 1 with one line on stderr and no traceback; SIGKILL at random
    moments while checkpoints are written every iteration always leaves a loadable checkpoint."""
    p = run(['train.py', 'config/moe.py', *TINY, f'--data_dir={data_dir}', '--batch_size=0'], check=False)
    assert p.returncode == 1 and p.stderr == 'error: batch_size=0 must be >= 1\n', p.stderr
    out = tmp_path / 'out'
    rng = random.Random(0)
    for attempt in range(3):
        init = 'resume' if (out / 'ckpt.pt').exists() else 'scratch'
        proc = subprocess.Popen([sys.executable, 'train.py', 'config/deepseek_moe.py', *TINY, f'--data_dir={data_dir}',
                                 f'--out_dir={out}', '--max_iters=100000', '--eval_interval=1', '--eval_iters=1',
                                 '--always_save_checkpoint=True', f'--init_from={init}'],
                                cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while not (out / 'ckpt.pt').exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 1.5))             # checkpoints are written every iteration: kill mid-way
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
        model, ckpt = load_checkpoint(str(out / 'ckpt.pt'))
        assert ckpt['iter_num'] >= 1


def test_user_errors_are_one_clean_line(data_dir, tmp_path):
    def train(*args):
        return run_script('train.py', args, check=False)
    for bad, message in (('--batch_size=0', 'batch_size=0 must be >= 1'),
                         ('--max_iters=200', 'warmup_iters=200 must be smaller than lr_decay_iters=200')):
        p = train('config/moe.py', '--lr_decay_iters=200', bad)
        assert p.returncode != 0 and p.stderr.startswith('error: ') and message in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    p = train('config/moe.py', *TINY, f'--data_dir={tmp_path / "missing"}')
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    assert p.stderr.strip().startswith('error:') and 'train.bin not found; run python data/tinystories/prepare.py' in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = train('config/moe.py', '--top_k=9')              # 8 experts
    assert p.returncode != 0 and 'Traceback' not in p.stderr and 'top_k=9 is impossible' in p.stderr
    impossible = [('--moe_dispatch=fast', 'moe_dispatch must be auto|grouped|loop')]
    if not torch.cuda.is_available():
        impossible.append(('--device=cuda', "device 'cuda' requested, but this PyTorch"))
    if not torch.backends.mps.is_available():
        impossible.append(('--device=mps', "device 'mps' requested"))
    for request, message in impossible:
        p = train('config/moe.py', request)
        assert p.returncode != 0 and p.stderr.startswith('error: ') and message in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    p = train('config/moe.py', '--dtype=fp16')
    assert 'dtype must be' in p.stderr and 'Traceback' not in p.stderr
    p = train('config/moe.py', '--n_expert=4')
    assert "did you mean 'n_experts'" in p.stderr and 'Traceback' not in p.stderr
    # a corrupt checkpoint: a clear message on resume, and the file is left as it was
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'ckpt.pt').write_bytes(b'\x00garbage' * 100)
    p = train('config/moe.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--init_from=resume',
              '--max_iters=5')
    assert p.returncode != 0 and 'Traceback' not in p.stderr and 'corrupt' in p.stderr
    assert (out / 'ckpt.pt').read_bytes() == b'\x00garbage' * 100
    # training from scratch into a run directory with a checkpoint refuses instead of overwriting it
    p = train('config/moe.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=5')
    assert p.returncode != 0 and '--init_from=resume' in p.stderr
    assert (out / 'ckpt.pt').read_bytes() == b'\x00garbage' * 100


def test_non_finite_loss_stops_with_the_iteration(tiny_runs, tmp_path):
    out = copy_run(tiny_runs['dense'][0], tmp_path)
    before = (out / 'ckpt.pt').read_bytes()
    p = run_script('train.py', [f'--out_dir={out}', *BLOW_UP, '--max_iters=90'], check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    assert re.search(r'non-finite loss at iteration 6\d\b', p.stderr), p.stderr   # resumed at 60: names the bad one
    assert (out / 'ckpt.pt').read_bytes() == before                 # the last good checkpoint stays


def test_sample_refuses_a_model_whose_ids_are_not_its_vocabulary_s(tiny_runs):
    """tiny_runs trained on hand-made ids (no meta.pkl) with vocab_size 128: GPT-2's encoding of a prompt would index
    past the embedding (it raised IndexError); one line instead."""
    p = run_script('sample.py', [f'--out_dir={tiny_runs["dense"][0]}', '--device=cpu'], check=False)
    assert p.returncode == 1 and p.stderr.count('\n') == 1 and p.stderr.startswith('error: '), p.stderr
    assert 'has 128 token ids, fewer than the 50,257' in p.stderr and 'data/*/prepare.py' in p.stderr


def test_sample_prints_prompt_and_continuation(gpt2_runs, tmp_path):
    out = gpt2_runs['deepseek_moe'][0]
    # the process once (exit code 0, what it prints); the other prompts and the error inside this process
    p = run(['sample.py', f'--out_dir={out}', '--start=Once upon a time', '--num_samples=2', '--max_new_tokens=12',
             '--device=cpu'])
    samples = p.stdout.split('---------------\n')
    assert len(samples) == 3 and samples[-1] == ''
    for s in samples[:2]:
        assert s.startswith('Once upon a time') and len(s) > len('Once upon a time') + 5
    prompt = tmp_path / 'prompt.txt'
    prompt.write_text('Lily had a red ball.')
    p = run_script('sample.py', [f'--out_dir={out}', f'--start=FILE:{prompt}', '--num_samples=1', '--max_new_tokens=5',
                                 '--device=cpu'])
    assert p.stdout.startswith('Lily had a red ball.')
    p = run_script('sample.py', [f'--out_dir={out}', '--start=', '--num_samples=1', '--max_new_tokens=5',
                                 '--device=cpu'])                              # empty prompt: starts from <|endoftext|>
    assert p.returncode == 0 and len(p.stdout.split('---------------\n')) == 2
    p = run_script('sample.py', [f'--out_dir={tmp_path / "nowhere"}'], check=False)
    assert p.returncode != 0 and 'not found' in p.stderr and 'Traceback' not in p.stderr


# -----------------------------------------------------------------------------
# every number right: timing windows, accumulated losses, token counts, DDP resume and stop


def test_train_rows_time_the_steps_they_cover(data_dir, tmp_path):
    """With an eval inside a log window, the window's time covers only the steps since the eval: ms/iter must
    divide by those steps, not by log_interval. The train row at 10 and the eval row at 10 then time the same
    5 steps and agree; dividing by 10 made the train rows claim twice the speed."""
    out = tmp_path / 'out'
    run_script('train.py', ['config/dense.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=40',
                            '--eval_interval=5', '--log_interval=10', '--lr_decay_iters=40', '--eval_iters=1'])
    rows = metrics(out)
    train = {r['iter']: r for r in rows if r['type'] == 'train'}
    ev = {r['iter']: r for r in rows if r['type'] == 'eval'}
    ratios = [train[i]['tokens_per_s'] / ev[i]['tokens_per_s'] for i in (10, 20, 30, 40)]
    assert all(0.7 < r < 1.4 for r in ratios), ratios


def test_logged_loss_is_the_mean_over_micro_steps(data_dir, tmp_path):
    """gradient_accumulation_steps=4 of 2 sequences draws the same 8 windows as one micro-step of 8 (the sampler
    is one stream), so the step's mean loss is the same; the last micro-step's alone is not."""
    common = ['config/dense.py', *TINY, f'--data_dir={data_dir}', '--max_iters=3', '--eval_interval=3',
              '--lr_decay_iters=10', '--log_interval=1']
    run_script('train.py', [*common, f'--out_dir={tmp_path / "one"}', '--batch_size=8'])
    run_script('train.py', [*common, f'--out_dir={tmp_path / "four"}', '--batch_size=2',
                            '--gradient_accumulation_steps=4'])
    one = [r['loss'] for r in metrics(tmp_path / 'one') if r['type'] == 'train']
    four = [r['loss'] for r in metrics(tmp_path / 'four') if r['type'] == 'train']
    assert len(one) == len(four) == 3
    assert four == pytest.approx(one, abs=2e-4)


def test_a_nan_in_the_first_micro_step_stops_that_step(data_dir, tmp_path, monkeypatch):
    """The check covers the whole step's loss, not only the last micro-step's: a NaN in micro-step 0 of
    iteration 2 stops the run at iteration 2, before its update is applied."""
    import model as model_module
    calls = {'n': 0}
    forward = model_module.GPT.forward

    def poisoned(self, idx, targets=None, return_aux=False):
        out = forward(self, idx, targets, return_aux)
        if self.training:
            calls['n'] += 1
            if calls['n'] == 5:                      # 2 micro-steps a step: iterations 0, 1, then 2's first
                logits, loss, aux = out
                return logits, loss * float('nan'), {**aux, 'ce_loss': aux['ce_loss'] * float('nan')}
        return out
    monkeypatch.setattr(model_module.GPT, 'forward', poisoned)
    p = run_script('train.py', ['config/dense.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path / "out"}',
                                '--max_iters=10', '--eval_interval=10', '--lr_decay_iters=10',
                                '--gradient_accumulation_steps=2'], check=False)
    assert p.returncode == 1 and 'non-finite loss at iteration 2 ' in p.stderr, p.stderr


def test_tokens_are_counted_across_a_resume_that_changes_the_batch(tiny_runs, tmp_path):
    out = copy_run(tiny_runs['dense'][0], tmp_path)                 # 60 iterations of 8 x 32 tokens
    run_script('train.py', [f'--out_dir={out}', '--init_from=resume', '--max_iters=80', '--batch_size=4'])
    ev = {r['iter']: r for r in evals(out)}
    assert ev[60]['tokens'] == 60 * 8 * 32
    assert ev[80]['tokens'] == 60 * 8 * 32 + 20 * 4 * 32          # not 80 steps of the batch of now
    train = {r['iter']: r for r in metrics(out) if r['type'] == 'train'}
    assert train[65]['tokens'] == 60 * 8 * 32 + 5 * 4 * 32


def torchrun(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """2 gloo processes; gradient_accumulation_steps=2 (the global count: one micro-step per rank)."""
    return run(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *args,
                '--gradient_accumulation_steps=2'], check=check, timeout=600)


def test_ddp_two_cpu_processes_with_gloo(data_dir, tmp_path):
    """train.py under torchrun, 2 gloo processes, deepseek_moe with dropout; five launches check:
    - a run: one config row (rank 0 writes), the expert counts of both ranks, biases identical on both ranks;
    - resume with dropout is exact: every rank's dropout masks come from (seed, rank, iteration), so a resumed run
      equals the uninterrupted one (the checkpoint once held rank 0's RNG state, which every rank then loaded);
    - a non-finite loss ends every rank with the message, at an evaluation (rank 0 evaluates and tells the others)
      and in a step (every rank sees the all-reduced loss), and leaves the checkpoint alone. No rank may be left
      waiting in a collective (the timeout would catch a hang)."""
    common = ['train.py', 'config/deepseek_moe.py', *TINY, f'--data_dir={data_dir}', '--eval_interval=10',
              '--lr_decay_iters=30', '--dropout=0.1']
    a = tmp_path / 'a'
    p = torchrun([*common, f'--out_dir={a}', '--max_iters=30'])
    assert 'balancing biases identical on all 2 ranks' in p.stdout
    rows = metrics(a)
    assert sum(r['type'] == 'config' for r in rows) == 1 and rows[0]['world_size'] == 2   # written by rank 0 only
    ev = evals(a)
    assert [r['iter'] for r in ev] == [0, 10, 20, 30]
    # each step: 2 ranks x 1 micro-step x 8 x 32 tokens x top-6, summed over the 10 steps since the last eval
    assert sum(ev[-1]['expert_counts'][0]) == 10 * 2 * 8 * 32 * 6
    model, _ = load_checkpoint(str(a / 'ckpt.pt'))
    assert model.moe_layers()[0].expert_bias.abs().sum() > 0
    # resumed at 20: the uninterrupted run's losses
    b = tmp_path / 'b'
    torchrun([*common, f'--out_dir={b}', '--max_iters=20', '--always_save_checkpoint=True'])
    nan = copy_run(b, tmp_path, 'nan')                             # its checkpoint at 20, for the non-finite runs
    torchrun(['train.py', f'--out_dir={b}', '--max_iters=30', '--init_from=resume'])
    eb = evals(b)
    assert [r['iter'] for r in eb] == [0, 10, 20, 30]
    for ra, rb in zip(ev, eb):
        assert rb['val_loss'] == pytest.approx(ra['val_loss'], abs=1e-4)
        assert rb['train_loss'] == pytest.approx(ra['train_loss'], abs=1e-4)
    # the update of step 20 blows the weights up; the eval at 21 (the last) sees NaN on rank 0
    before = (nan / 'ckpt.pt').read_bytes()
    blow_up = ['--init_from=resume', '--learning_rate=1e30', '--warmup_iters=0', '--grad_clip=0']
    p = torchrun(['train.py', f'--out_dir={nan}', *blow_up, '--max_iters=21'], check=False)
    assert p.returncode != 0 and p.stderr.count('non-finite loss at the evaluation of iteration 21') == 2, p.stderr
    # a step whose loss is non-finite: both ranks stop at the same iteration
    p = torchrun(['train.py', f'--out_dir={nan}', *blow_up, '--max_iters=50'], check=False)
    assert p.returncode != 0 and len(re.findall(r'non-finite loss at iteration 21\b', p.stderr)) == 2, p.stderr
    assert (nan / 'ckpt.pt').read_bytes() == before


def test_expert_choice_run_logs_both_evaluations_and_perfect_training_balance(data_dir, tmp_path):
    out = tmp_path / 'out'
    p = run_script('train.py', ['config/moe_expert_choice.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}',
                                '--max_iters=20', '--eval_interval=10', '--lr_decay_iters=20'])
    ev = evals(out)
    assert [r['iter'] for r in ev] == [0, 10, 20]
    for r in ev:
        assert 'val_loss_leaky' in r and r['eval_routing'].startswith('val_loss: token by token (causal)')
        assert r['val_loss_leaky'] != r['val_loss']
    assert ev[-1]['maxvio_batch'] == [0.0, 0.0]               # every expert gets exactly C in training
    assert min(ev[-1]['maxvio_global']) > 0                   # the causal evaluation routes token by token
    assert '(leaky: ' in p.stdout
    assert [r for r in metrics(out) if r['type'] == 'expert_selection'][0]['counts']   # causal, like eval


def test_resume_refuses_data_of_another_vocabulary(tiny_runs, tmp_path):
    """A checkpoint trained on GPT-2-style ids resumed on a compact dataset (or the other way round) would go on
    training on ids that mean other tokens: refused in one line."""
    import pickle
    out = copy_run(tiny_runs['dense'][0], tmp_path)                 # data without a meta.pkl: GPT-2-style ids
    compact = random_token_data(tmp_path / 'compact', 128, 3000)
    with open(os.path.join(compact, 'meta.pkl'), 'wb') as f:
        pickle.dump({'vocab_size': 300, 'gpt2_ids': list(range(256)) + list(range(1000, 1043)) + [50256]}, f)
    p = run_script('train.py', [f'--out_dir={out}', '--init_from=resume', '--max_iters=70', f'--data_dir={compact}'],
                   check=False)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and 'Traceback' not in p.stderr, p.stderr
    assert 'holds ids of a 300-token compact vocabulary, but the checkpoint was trained on GPT-2 one' in p.stderr


def test_expert_choice_group_must_divide_the_batch_and_eval_only_always_looks(data_dir, tiny_runs, tmp_path):
    p = run_script('train.py', ['config/moe_expert_choice.py', *TINY, f'--data_dir={data_dir}',
                                f'--out_dir={tmp_path / "x"}', '--expert_choice_group=48'], check=False)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and 'Traceback' not in p.stderr
    assert 'expert_choice_group=48 must divide the 256 tokens of a batch' in p.stderr
    # a look with another eval_interval than the run's still evaluates (it once wrote only a config row): the run
    # ended at 60, which 7 does not divide
    out = copy_run(tiny_runs['dense'][0], tmp_path)
    run_script('train.py', [f'--out_dir={out}', '--init_from=resume', '--eval_only=True', '--eval_interval=7'])
    looks = [r for r in evals(out) if r.get('eval_only')]
    assert len(looks) == 1 and looks[0]['iter'] == 60


def test_gpt2_data_needs_gpt2_s_vocabulary_without_a_scan(tmp_path):
    """prepare.py's meta.json says GPT-2 ids need 50,257 entries: a smaller vocab_size is refused even if the ids
    present happen to be small (the files are not scanned)."""
    d = random_token_data(tmp_path / 'data', 100, 3000)
    with open(os.path.join(d, 'meta.json'), 'w') as f:
        json.dump({'tokenizer': 'tiktoken gpt2', 'vocab_size': 50257}, f)
    p = run_script('train.py', ['config/dense.py', *TINY, f'--data_dir={d}', f'--out_dir={tmp_path / "x"}'],
                   check=False)
    assert p.returncode != 0 and 'vocab_size=128 is smaller than the data needs: it holds token ids up to 50256' in p.stderr


def test_a_stale_gpt2_bin_beside_a_compact_meta_pkl_is_one_line(tmp_path):
    """GPT-2 ids (up to 50,256) beside a compact meta.pkl of 300 ids, as a kill between prepare.py --vocab's renames
    leaves them: train.py took vocab_size 300 from meta.pkl and crashed in the embedding (IndexError; a device-side
    assert on a GPU). It must check the ids first and say how to rewrite the folder."""
    import pickle
    d = random_token_data(tmp_path / 'data', 50257, 3000)
    with open(os.path.join(d, 'meta.pkl'), 'wb') as f:
        pickle.dump({'vocab_size': 300, 'gpt2_ids': list(range(256)) + list(range(1000, 1043)) + [50256]}, f)
    args = ['config/dense.py', *[a for a in TINY if not a.startswith('--vocab_size')], f'--data_dir={d}',
            f'--out_dir={tmp_path / "out"}', '--max_iters=2']
    p = run_script('train.py', args, check=False)
    message = p.stderr
    assert p.returncode == 1 and message.count('\n') == 1, message
    assert message.startswith(f"error: {d}/train.bin holds token id 5"), message
    assert "describes 300 ids (0..299)" in message
    assert message.endswith(f"write the folder again with python data/<name>/prepare.py --vocab 300 --out-dir {d}\n")
    assert not os.path.exists(tmp_path / 'out' / 'ckpt.pt')


def test_the_balancing_bias_follows_bias_update_schedule(data_dir, tmp_path):
    """config/deepseek_moe.py sets bias_update_schedule='lr': after the warmup each step's gamma is scaled by the LR's
    decay. With an eval after every step, each eval row holds one step's expert counts, so the biases at the end must
    be the sum over steps of gamma * scale_t * sign(mean_t - load_t), computed here from those counts; under
    'constant' (what train.py did when it ignored the schedule) the sum differs."""
    from train import bias_update_scale
    out = tmp_path / 'out'
    run_script('train.py', ['config/deepseek_moe.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}',
                            '--max_iters=5', '--warmup_iters=2', '--lr_decay_iters=5', '--eval_interval=1',
                            '--eval_iters=1'])
    steps = [(r['iter'] - 1, np.array(r['expert_counts'], dtype=np.float64)) for r in evals(out) if 'expert_counts' in r]
    assert [it for it, _ in steps] == list(range(5))

    def biases(schedule: str) -> np.ndarray:
        total = 0.0
        for it, counts in steps:
            lr = get_lr(it, 3e-3, 2, 5, 3e-4)
            scale = bias_update_scale(schedule, it, lr, 3e-3, 2)
            total = total + 0.01 * scale * np.sign(counts.mean(-1, keepdims=True) - counts)   # (layers, E)
        return total
    model, _ = load_checkpoint(str(out / 'ckpt.pt'))
    final = np.stack([m.expert_bias.double().numpy() for m in model.moe_layers()])
    np.testing.assert_allclose(final, biases('lr'), atol=1e-6, rtol=0)
    assert np.abs(final - biases('constant')).max() > 1e-3


# -----------------------------------------------------------------------------
# watching the experts: the collapse warning and the per-layer wandb keys


def test_collapse_warning_by_hand():
    from train import collapse_warning
    hint = 'HINT'
    # two layers (blocks 1 and 3), four experts: an even interval says nothing
    assert collapse_warning([[5, 5, 5, 5], [4, 6, 5, 5]], [0.1, 0.3], [1, 3], 2.0, 0, 100, hint) == ''
    # block 3's experts 0 and 2 got nothing over iterations 100-199
    assert collapse_warning([[5, 5, 5, 5], [0, 10, 0, 10]], [0.1, 1.0], [1, 3], 2.0, 100, 200, hint) == (
        "warning: expert collapse in iterations 100-199: layer 3: experts 0, 2 (2 of 4) got no tokens. HINT")
    # block 1 above the threshold at its most even step; threshold 0 never warns about it
    line = collapse_warning([[17, 1, 1, 1], [5, 5, 5, 5]], [2.4, 0.0], [1, 3], 2.0, 0, 50, hint)
    assert line == ("warning: expert collapse in iterations 0-49: layer 1: maxvio_batch above 2 at every step "
                    "(lowest 2.40). HINT")
    assert collapse_warning([[17, 1, 1, 1]], [2.4], [1], 0, 0, 50, hint) == ''
    # both in one layer, one expert idle
    assert collapse_warning([[20, 0, 1, 1]], [2.5], [0], 2.0, 0, 10, hint) == (
        "warning: expert collapse in iterations 0-9: layer 0: expert 1 (1 of 4) got no tokens and maxvio_batch above 2 "
        "at every step (lowest 2.50). HINT")


def test_balancing_hint_names_what_is_on():
    from train import balancing_hint
    off = {**DEFAULTS}
    assert balancing_hint(off).startswith('Balancing is off: set bias_update_speed')
    assert balancing_hint({**DEFAULTS, 'bias_update_speed': 0.001, 'seq_aux_coef': 1e-4}).startswith(
        'Balancing (bias_update_speed=0.001, seq_aux_coef=0.0001) is too weak or too slow here: raise '
        'bias_update_speed')


def test_wandb_scalars_by_hand():
    from train import wandb_scalars
    train_row = {'type': 'train', 'iter': 10, 'loss': 2.5, 'maxvio_batch': [0.5, 1.5], 'dropped_frac': [0.0, 0.1]}
    assert wandb_scalars(train_row, [1, 3]) == {
        'iter': 10, 'loss': 2.5, 'maxvio_batch/layer1': 0.5, 'maxvio_batch/layer3': 1.5,
        'dropped_frac/layer1': 0.0, 'dropped_frac/layer3': 0.1}
    eval_row = {'type': 'eval', 'iter': 10, 'val_loss': 2.6, 'maxvio_global': [0.2, 0.4], 'maxvio_batch': [0.6, 1.0],
                'expert_counts': [[1, 2], [3, 4]], 'warning': 'text'}
    assert wandb_scalars(eval_row, [1, 3]) == {
        'iter': 10, 'val_loss': 2.6, 'maxvio_global/layer1': 0.2, 'maxvio_global/layer3': 0.4,
        'eval_maxvio_batch/layer1': 0.6, 'eval_maxvio_batch/layer3': 1.0}


def test_a_collapsing_router_warns_and_wandb_gets_every_layer(data_dir, tmp_path, monkeypatch):
    """config/moe.py with its balancing losses off and every router biased to experts 0 and 1 from the start: at each
    eval the run prints one warning line naming the layers, the idle experts and what helps. The same run logs to
    wandb offline: per MoE layer maxvio_batch, maxvio_global, the dropped share, and the expert shares at evals."""
    wandb = pytest.importorskip('wandb')
    import model as model_module
    init = model_module.GPT.__init__

    def collapsed(self, config):
        init(self, config)
        for layer in self.moe_layers():
            layer.expert_bias[2:] = -10.0            # softmax scores lie in [0, 1]: only experts 0 and 1 are chosen
    monkeypatch.setattr(model_module.GPT, '__init__', collapsed)
    logged = []                                      # what train.py hands wandb (wandb.init rebinds wandb.log)
    log = wandb.Run.log
    monkeypatch.setattr(wandb.Run, 'log',
                        lambda run, row, step=None: (logged.append((step, row)), log(run, row, step=step)))
    for name, value in (('WANDB_MODE', 'offline'), ('WANDB_DIR', str(tmp_path)), ('WANDB_CONSOLE', 'off'),
                        ('WANDB_SILENT', 'true')):
        monkeypatch.setenv(name, value)
    out = tmp_path / 'out'
    p = run_script('train.py', ['config/moe.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=4',
                                '--lr_decay_iters=8', '--eval_interval=2', '--eval_iters=1', '--log_interval=1',
                                '--balance_loss_coef=0', '--z_loss_coef=0', '--wandb_log=True'])
    warnings = [line for line in p.stdout.splitlines() if line.startswith('warning:')]
    assert len(warnings) == 2, warnings                  # the evals at 2 and 4; none at 0 (no steps yet)
    assert warnings[0] == (
        "warning: expert collapse in iterations 0-1: layer 0: experts 2, 3, 4, 5, 6, 7 (6 of 8) got no tokens and "
        "maxvio_batch above 2 at every step (lowest 3.00); layer 1: experts 2, 3, 4, 5, 6, 7 (6 of 8) got no tokens "
        "and maxvio_batch above 2 at every step (lowest 3.00). Balancing is off: set bias_update_speed "
        "(auxiliary-loss-free, e.g. 0.001-0.01) or balance_loss_coef (the Switch loss, e.g. 0.01); "
        "results/balance/README.md compares them")
    assert [r['warning'] for r in evals(out) if 'warning' in r] == warnings
    # wandb: every layer's numbers, named by block
    keys = set().union(*(row for _, row in logged))
    for key in ('maxvio_batch', 'dropped_frac', 'maxvio_global', 'eval_maxvio_batch', 'eval_dropped_frac',
                'expert_share'):
        assert {f'{key}/layer0', f'{key}/layer1'} <= keys, (key, sorted(keys))
    shares = [(step, row['expert_share/layer1']) for step, row in logged if 'expert_share/layer1' in row]
    assert [step for step, _ in shares] == [2, 4] and isinstance(shares[0][1], wandb.Histogram)
    assert shares[0][1].histogram == pytest.approx([0.5, 0.5, 0, 0, 0, 0, 0, 0])
    # and they reached the offline run's file (written out when wandb's service stops: at exit, or here)
    wandb.teardown()
    [run_file] = (tmp_path / 'wandb').glob('offline-run-*/run-*.wandb')
    data = run_file.read_bytes()
    assert b'eval_maxvio_batch/layer1' in data and b'expert_share/layer0' in data
