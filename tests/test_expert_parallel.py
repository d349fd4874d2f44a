"""Expert parallelism against one process: 2 and 4 gloo processes on the CPU (torch.multiprocessing), each check
against the same computation done whole in every process (the same seeds give every process every rank's data)."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from expert_parallel import (clip_gradients, expert_groups, expert_params, full_checkpoint_state, keep_local_experts,
                             local_optimizer_state, sync_gradients)
from model import GPT, GPTConfig, load_checkpoint
from moe import all_to_all_experts
from test_moe import CASES, make_layer
from conftest import REPO, TINY, run_script
from test_train import evals, metrics, run
from train import DEFAULTS, check_settings


def spawn(fn, world: int, tmp_path, *args) -> None:
    """fn(rank, world, *args) in world gloo processes; a failed assert in any of them fails the test. Forked, not
    spawned: a spawned process imports torch and these tests again (2-3 s each, 4 processes on 2 cores), a forked
    one has them already (PyTorch's own distributed tests fork too); no process group exists before the fork."""
    mp.start_processes(_worker, args=(fn, world, str(tmp_path / 'store'), args), nprocs=world, start_method='fork')


def _worker(rank: int, fn, world: int, store: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=world)
    fn(rank, world, *args)
    dist.barrier()               # no rank tears the group down while another still uses it (gloo aborts)
    dist.destroy_process_group()


# -----------------------------------------------------------------------------
# the exchange


def _round_trip(rank: int, world: int) -> None:
    E, C = 6, 4
    E_local = E // world
    all_counts = [torch.randint(0, 4, (E,), generator=torch.Generator().manual_seed(r)) for r in range(world)]
    counts = all_counts[rank]
    kept = int(counts.sum())
    xs = torch.randn(kept + 2, C, generator=torch.Generator().manual_seed(10 + rank))   # + 2 dropped slots
    xs[:kept, 0] = torch.arange(E).repeat_interleave(counts).float()                   # column 0: the slot's expert
    xs.requires_grad_()
    arrived = {}

    def identity_experts(rows, local_counts):
        arrived['rows'], arrived['counts'] = rows.detach(), local_counts
        return rows

    ys = all_to_all_experts(xs, counts, identity_experts, dist.group.WORLD)
    # every rank's slots for my experts, grouped by my expert (its global id in column 0)
    expected = sum(c[rank * E_local:(rank + 1) * E_local] for c in all_counts)
    assert torch.equal(arrived['counts'], expected)
    mine = rank * E_local + torch.arange(E_local).repeat_interleave(expected).float()
    assert torch.equal(arrived['rows'][:, 0], mine)
    # identity experts: the slots come back as they left, the dropped ones as zeros; and so do their gradients
    assert torch.equal(ys[:kept], xs[:kept].detach()) and torch.equal(ys[kept:], torch.zeros(2, C))
    upstream = torch.randn(ys.shape, generator=torch.Generator().manual_seed(20 + rank))
    ys.backward(upstream)
    assert torch.equal(xs.grad[:kept], upstream[:kept]) and torch.equal(xs.grad[kept:], torch.zeros(2, C))


# -----------------------------------------------------------------------------
# one MoE layer: EP against the whole layer


def _layer_equals_whole(rank: int, world: int, case: dict, dispatch: str, one_sided: bool = False) -> None:
    """one_sided: biases that send every token to rank 0's experts, so that rank 1's get no rows at all."""
    whole = make_layer(dispatch=dispatch, **case)
    if whole.deepseek:
        with torch.no_grad():
            rank_0s = (torch.arange(whole.n_experts) < whole.n_experts // world) * 10.0
            whole.expert_bias.copy_(rank_0s if one_sided else torch.linspace(-0.3, 0.3, whole.n_experts))
    xs = [torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    ups = [torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(100 + r)) for r in range(world)]
    # the whole layer on every rank's tokens, one rank at a time: outputs, input gradients, and the expert gradients
    # summed over the ranks' losses (each rank's tokens decide capacity and dropping, as under DDP)
    ref = []
    for x, up in zip(xs, ups):
        x = x.clone().requires_grad_()
        y, aux = whole(x)
        ref.append((y.detach(), torch.autograd.grad((y * up).sum(), [x, *whole.parameters()]), aux))
    ep = make_layer(dispatch=dispatch, **case)
    ep.load_state_dict(whole.state_dict())
    keep_local_experts(_Model(ep), dist.group.WORLD)
    assert ep.w_gate.shape[0] == whole.n_experts // world
    x = xs[rank].clone().requires_grad_()
    y, aux = ep(x)

    def close(a, b, what):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{case} {dispatch}, {what}: {m}")
    close(y, ref[rank][0], 'output')
    close(aux['dropped_frac'], ref[rank][2]['dropped_frac'], 'dropped share')
    if case.get('capacity_factor') and case.get('routing') != 'expert_choice':
        assert aux['dropped_frac'] > 0                # the case really drops slots
    grads = torch.autograd.grad((y * ups[rank]).sum(), [x, *ep.parameters()])
    names = [n for n, _ in whole.named_parameters()]
    E_local = ep.w_gate.shape[0]
    for name, g, whole_g in zip(names, grads[1:], ref[rank][1][1:]):
        if name in ('w_gate', 'w_up', 'w_down'):     # this rank's slice of the sum over all ranks' losses
            want = sum(r[1][1 + names.index(name)] for r in ref)[rank * E_local:(rank + 1) * E_local]
        else:                                         # replicated: this rank's own loss
            want = whole_g
        close(g, want, f'gradient of {name}')
    close(grads[0], ref[rank][1][0], 'gradient of the input')


class _Model(torch.nn.Module):
    """A single MoE layer seen as a model with one MoE layer (what keep_local_experts walks)."""
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def moe_layers(self):
        return [self.layer]


EP_CASES = [CASES[2], CASES[5], CASES[6], dict(ffn_type='moe', routing='expert_choice', capacity_factor=1.0)]


def _exchange_and_layers(rank: int, world: int) -> None:
    _round_trip(rank, world)
    for case in EP_CASES:
        for dispatch in ('grouped', 'loop'):
            _layer_equals_whole(rank, world, case, dispatch)
    _layer_equals_whole(rank, world, CASES[5], 'grouped', one_sided=True)


def test_all_to_all_round_trip_and_ep_layers_equal_the_whole_layer(tmp_path):
    """The all-to-all round trip with identity experts returns the slots and their gradients; an EP layer's outputs,
    input gradients and expert gradients equal the whole layer's: standard MoE with capacity (H > C), DeepSeekMoE
    (sigmoid, shared experts, biased choice) dropless and with capacity, expert choice; grouped and loop; and a rank
    whose experts no token chose. One spawn
    for all (starting 2 processes costs more than the checks)."""
    spawn(_exchange_and_layers, 2, tmp_path)


# -----------------------------------------------------------------------------
# a whole model: gradients, clipping, AdamW steps and the checkpoint against DDP's


def _steps_equal_ddp(rank: int, world: int) -> None:
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, ffn_type='deepseek_moe',
                    n_dense_layers=1, n_experts=4, top_k=2, expert_hidden=16, n_shared_experts=1, score_func='sigmoid',
                    seq_aux_coef=0.01)
    tokens = [torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(r)) for r in range(world)]
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]             # (inputs, targets)
    for ep in (2, world):
        torch.manual_seed(0)
        ddp = GPT(cfg)                   # DDP's step, done whole in every process: the mean of every rank's gradient
        model = copy.deepcopy(ddp)       # the same initial weights, cut to this rank's experts
        ep_group, replica_group = expert_groups(ep)
        keep_local_experts(model, ep_group)
        n_local = sum(p.numel() for p in expert_params(model))
        assert n_local * ep == sum(p.numel() for p in expert_params(ddp))      # 1/ep of the expert parameters
        assert model.param_counts() == ddp.param_counts()                       # counted whole
        opt_ddp = ddp.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu')
        opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu')
        slot = dist.get_rank(ep_group)
        experts = {id(p) for p in expert_params(model)}
        for step in range(2):
            grads = [torch.autograd.grad(ddp(*b)[1], list(ddp.parameters())) for b in batches]
            for p, *g in zip(ddp.parameters(), *grads):
                p.grad = sum(g) / world
            norm_ddp = torch.nn.utils.clip_grad_norm_(ddp.parameters(), 0.05)      # small: it clips
            _, loss = model(*batches[rank])
            loss.backward()
            sync_gradients(model, replica_group, world)
            norm = clip_gradients(model, 0.05, ep_group)
            torch.testing.assert_close(norm, norm_ddp, msg=lambda m: f"ep={ep} step {step}, grad norm: {m}")
            for (name, p), q in zip(model.named_parameters(), ddp.parameters()):
                want = q.grad.chunk(ep)[slot] if id(p) in experts else q.grad
                torch.testing.assert_close(p.grad, want, atol=1e-6, rtol=1e-5, msg=lambda m: f"ep={ep} {name}: {m}")
            opt_ddp.step()
            opt.step()
            opt_ddp.zero_grad()
            opt.zero_grad()
        # the checkpoint: whole tensors on rank 0, as the DDP run's; and cut again for a resume. (Adam divides by the
        # root of the second moment, so a gradient near 0 turns rounding into an update: 1e-5 after two steps)
        saved = full_checkpoint_state(model, opt, ep_group)
        if rank == 0:
            for key, value in ddp.state_dict().items():
                torch.testing.assert_close(saved[0][key], value, atol=1e-5, rtol=1e-5,
                                           msg=lambda m: f"ep={ep} {key}: {m}")
            for i, state in opt_ddp.state_dict()['state'].items():
                for key, value in state.items():
                    torch.testing.assert_close(saved[1]['state'][i][key], value, atol=1e-6, rtol=1e-5)
        else:
            assert saved is None
        local = local_optimizer_state(opt_ddp.state_dict(), opt, model, ep_group)
        for i, state in opt.state_dict()['state'].items():
            for key, value in state.items():
                torch.testing.assert_close(local['state'][i][key], value, atol=1e-6, rtol=1e-5)


def test_ep_steps_equal_ddp_s_with_two_and_four_ranks_per_group(tmp_path):
    """4 processes, expert_parallel 2 (two replicas of each slice: a gradient divided by the replica group's size
    instead of the world's would take twice DDP's step) and 4: after sync_gradients and clip_gradients every gradient
    and the clipped norm equal DDP's (the mean over ranks), two AdamW steps give DDP's weights and moments, the
    checkpoint state holds them whole on rank 0, and a DDP optimizer state cut for this rank is this rank's."""
    spawn(_steps_equal_ddp, 4, tmp_path)


# -----------------------------------------------------------------------------
# train.py under torchrun: an EP run is the DDP run, and their checkpoints open everywhere


def torchrun(args: list[str], micro_steps: int = 0):
    """train.py in 2 gloo processes; micro_steps: the global gradient_accumulation_steps (0: a resume keeps its own)."""
    return run(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *args,
                *([f'--gradient_accumulation_steps={micro_steps}'] if micro_steps else [])], timeout=600)


def test_ep_run_matches_ddp_and_their_checkpoints_resume_each_other(data_dir, tmp_path):
    """20 steps of deepseek_moe (bias updates, sequence loss, dropout, 2 micro-steps per rank) with 2 gloo processes:
    steps 0-10 from scratch under EP and under DDP, then 10-20 with each resuming the other's checkpoint. Losses
    equal to 1e-4, biases identical on both ranks, each rank holds half the experts, the EP checkpoint holds the
    experts whole (the DDP one's tensors) and a single process opens it."""
    common = ['train.py', 'config/deepseek_moe.py', *TINY, f'--data_dir={data_dir}', '--eval_interval=10',
              '--lr_decay_iters=20', '--log_interval=1', '--dropout=0.1']
    ep = tmp_path / 'ep'
    ddp = tmp_path / 'ddp'
    p = torchrun([*common, f'--out_dir={ep}', '--max_iters=10', '--expert_parallel=2'], micro_steps=4)
    assert 'each rank holds 15 of the 30 routed experts of every MoE layer' in p.stdout
    assert 'balancing biases identical on all 2 ranks' in p.stdout
    torchrun([*common, f'--out_dir={ddp}', '--max_iters=10'], micro_steps=4)
    a, b = load_checkpoint(str(ep / 'ckpt.pt'))[1], load_checkpoint(str(ddp / 'ckpt.pt'))[1]
    assert a['model']['transformer.h.0.ffn.w_gate'].shape[0] == 30
    for key, value in b['model'].items():
        torch.testing.assert_close(a['model'][key], value, atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
    for i, state in b['optimizer']['state'].items():
        for key, value in state.items():
            torch.testing.assert_close(a['optimizer']['state'][i][key], value, atol=1e-5, rtol=1e-4)
    # a single process opens the EP checkpoint: its evaluation is the EP run's last
    run_script('train.py', [f'--out_dir={ep}', '--init_from=resume', '--eval_only=True'])
    look = [r for r in evals(ep) if r.get('eval_only')][0]
    assert look['val_loss'] == pytest.approx(evals(ep)[-2]['val_loss'], abs=1e-4)
    # each resumes the other's checkpoint: EP from DDP's, DDP from EP's
    p = torchrun(['train.py', f'--out_dir={ddp}', '--init_from=resume', '--max_iters=20', '--expert_parallel=2'])
    assert 'balancing biases identical on all 2 ranks' in p.stdout
    torchrun(['train.py', f'--out_dir={ep}', '--init_from=resume', '--max_iters=20'])
    def rows(out_dir, steps) -> list[dict]:
        return [r for r in metrics(out_dir)
                if r['type'] in ('train', 'eval') and r['iter'] in steps and not r.get('eval_only')]
    ep_rows = rows(ep, range(11)) + rows(ddp, range(11, 21))        # EP: from scratch, then from DDP's checkpoint
    ddp_rows = rows(ddp, range(11)) + rows(ep, range(11, 21))       # DDP: from scratch, then from EP's checkpoint
    assert [(r['type'], r['iter']) for r in ep_rows] == [(r['type'], r['iter']) for r in ddp_rows]
    assert len([r for r in ep_rows if r['type'] == 'train']) == 20
    for r, s in zip(ep_rows, ddp_rows):
        for key in ('loss', 'train_loss', 'val_loss'):
            if key in r:
                assert r[key] == pytest.approx(s[key], abs=1e-4), (r, s)


def test_compare_groups_ep_and_ddp_runs_as_seeds_of_one_experiment():
    from compare import differing_settings
    assert differing_settings([dict(DEFAULTS), dict(DEFAULTS, expert_parallel=2)]) == []


def test_expert_parallel_settings_are_checked(data_dir, tmp_path):
    base = dict(DEFAULTS, ffn_type='moe', n_experts=8)
    check_settings(dict(base, expert_parallel=4))
    for bad, message in [(dict(n_experts=30, expert_parallel=4), 'expert_parallel=4 must divide n_experts=30'),
                         (dict(ffn_type='dense', expert_parallel=2), "ffn_type='dense' has none"),
                         (dict(expert_parallel=0), 'expert_parallel=0 must be >= 1')]:
        with pytest.raises(ValueError, match=message):
            check_settings(dict(base, **bad))
    p = run_script('train.py', ['config/moe.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path / "x"}',
                                '--expert_parallel=2'], check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert 'expert_parallel=2 must divide the number of processes (1); start them with torchrun' in p.stderr


# -----------------------------------------------------------------------------
# bench/all_to_all.py: its arithmetic by hand


def _bench_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location('all_to_all', os.path.join(REPO, 'bench', 'all_to_all.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_all_to_all_arithmetic_by_hand():
    b = _bench_module()
    # config/moe.py at train.py's size: 6 MoE layers of 8 experts of 3 x 384 x 768 = 884,736 parameters each
    assert b.expert_memory(6, 8, 384, 768, 1) == 6 * 8 * 884_736 * 16 == 679_477_248
    assert b.expert_memory(6, 8, 384, 768, 8) == 679_477_248 / 8
    # 16,384 tokens x top-2 rows of 384 bf16 values, there and back, forward and backward; half leave at ep = 2
    assert b.all_to_all_bytes(6, 16_384, 2, 384, 2, 2) == 4 * 6 * 16_384 * 2 * 384 * 2 / 2 == 301_989_888
    assert b.all_to_all_bytes(6, 16_384, 2, 384, 2, 1) == 0                   # one rank: nothing travels
    # a ring all-reduce of 42.5M fp32 gradients over 2 ranks sends half of them; nothing when ep = world
    assert b.expert_allreduce_bytes(6, 8, 384, 768, 1, 2) == 6 * 8 * 884_736 * 4 == 169_869_312
    assert b.expert_allreduce_bytes(6, 8, 384, 768, 2, 2) == 0
    # EP's traffic over DDP's (ep = world) is T k b / (6 E H), whatever the width and depth
    ratio = b.all_to_all_bytes(6, 16_384, 2, 384, 2, 8) / b.expert_allreduce_bytes(6, 8, 384, 768, 1, 8)
    assert ratio == pytest.approx(16_384 * 2 * 2 / (6 * 8 * 768))
    assert [b.size(x) for x in (679_477_248, 1.0462e13, 54.49e9, 2.5e5)] == ['679 MB', '10.5 TB', '54.5 GB', '0.25 MB']

