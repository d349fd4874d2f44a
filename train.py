"""
Train a GPT with a dense, MoE or DeepSeekMoE feed-forward layer.

One GPU or the CPU:
    python train.py config/deepseek_moe.py
    python train.py config/moe.py --max_iters=100 --compile=False
Several GPUs (DDP), e.g. 8 on one node:
    torchrun --standalone --nproc_per_node=8 train.py config/deepseek_moe.py
... with the routed experts split across them (expert parallelism: expert_parallel.py, docs/expert_parallel.md):
    torchrun --standalone --nproc_per_node=8 train.py config/moe.py --expert_parallel=8
Continue an interrupted run from its checkpoint with the batches and dropout masks the uninterrupted run would have
drawn (bit for bit on the CPU; on CUDA atomics reorder sums, see docs/resuming.md; its settings come from the
checkpoint, what is given now overrides them):
    python train.py --init_from=resume --out_dir=out-deepseek_moe

The defaults below are the TinyStories comparison: config/*.py change only the FFN, so dense, moe
and deepseek_moe train on the same data, for the same steps, with the same optimizer.
"""

import gc
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch

from configurator import check_value, config_files, configure
from dataset import check_ids_fit, open_data, read_meta, resolve_data_dir, windows
from model import GPT, GPTConfig, model_from_checkpoint, read_checkpoint, save_checkpoint
from runtime import gpu_peak_flops, resolve_runtime
from moe import max_vio
from expert_parallel import (clip_gradients, expert_groups, expert_params, full_checkpoint_state, keep_local_experts,
                             local_optimizer_state, sync_gradients)

# -----------------------------------------------------------------------------
# default settings (config files and --key=value override them)
# I/O
out_dir = 'out'
eval_interval = 250          # evaluate train/val loss every this many iterations
log_interval = 10            # console line and a metrics row every this many iterations
eval_iters = 50              # batches per loss estimate
eval_only = False            # evaluate once and exit
always_save_checkpoint = False  # save at every eval, not only when val loss improves
init_from = 'scratch'        # 'scratch' | 'resume' (from out_dir/ckpt.pt)
# wandb logging (optional; works offline with WANDB_MODE=offline)
wandb_log = False
wandb_project = 'moe-gpt'
wandb_run_name = 'run'
# data
dataset = 'tinystories'      # data/<dataset>/{train,val}.bin, written by data/<dataset>/prepare.py
data_dir = ''                # '' = data/<dataset> next to this script
gradient_accumulation_steps = 1
batch_size = 64              # sequences per micro-step (per process)
block_size = 256
# model
vocab_size = 50304
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.0
bias = False
ffn_type = 'dense'           # 'dense' | 'moe' | 'deepseek_moe'
ffn_hidden = 1536
n_dense_layers = 0
# moe
n_experts = 8
top_k = 2
expert_hidden = 768
n_shared_experts = 0
capacity_factor = 0.0
score_func = 'softmax'
aux_loss_coef = 0.0
balance_loss_coef = 0.0
z_loss_coef = 0.0
seq_aux_coef = 0.0
bias_update_speed = 0.0      # gamma of auxiliary-loss-free balancing; 0 = off
bias_update_rule = 'sign'    # 'sign' (DeepSeek-V3) | 'proportional' (Wang et al. 2024)
bias_recenter = False        # re-centre the biases to mean 0 after each update (changes no routing decision)
bias_update_schedule = 'constant'  # 'constant' gamma | 'lr': full gamma through the warmup, then decayed as the LR is
                                   # (with decay_lr=False the LR stays, and so does gamma)
routing = 'token_choice'     # 'token_choice' | 'expert_choice' (Zhou et al. 2022; see GPTConfig and docs/moe_math.md)
expert_choice_group = 0      # expert choice: tokens an expert chooses among; 0 = the whole batch
moe_dispatch = 'auto'        # 'auto' (grouped where F.grouped_mm runs, see runtime.choose_runtime) | 'grouped' | 'loop'
warn_maxvio = 2.0            # warn when a layer's maxvio_batch stays above this at every step of an eval interval
                             # (its busiest expert over 3x its even share); 0 = never. Idle experts always warn.
                             # In results/'s CPU runs 2.0 flags every interval of the runs without balancing and
                             # none of config/moe.py's or deepseek_moe.py's; 1.0 flagged 2 of 5 moe.py runs early
# optim: AdamW, linear warmup then cosine decay to min_lr
learning_rate = 1e-3
max_iters = 5000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0              # clip the global gradient norm; 0 = off
decay_lr = True
warmup_iters = 200
lr_decay_iters = 5000        # usually = max_iters
min_lr = 1e-4                # usually learning_rate / 10
# system
device = 'auto'              # 'auto' (cuda, else mps, else cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = 'auto'               # 'auto' (see runtime.choose_runtime) | 'float32' | 'bfloat16' | 'float16' | 'float64'
compile = 'auto'             # 'auto' (on for CUDA GPUs from sm75) | True | False: torch.compile the model
seed = 1337
expert_parallel = 1          # under torchrun: the ranks that split every MoE layer's routed experts between them, each
                             # holding n_experts / expert_parallel (1 = off: every rank holds every expert, DDP)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
MODEL_KEYS = [f.name for f in fields(GPTConfig)]
# the settings that define the model (the shapes of its weights, its heads, its experts per token): a resumed
# run cannot change them
SHAPE_KEYS = ('n_layer', 'n_embd', 'n_head', 'vocab_size', 'block_size', 'ffn_type', 'ffn_hidden', 'n_experts',
              'top_k', 'expert_hidden', 'n_shared_experts', 'n_dense_layers', 'bias')


def check_settings(s: dict) -> None:
    """The checks GPTConfig does not do: counts, sizes, the optimizer and the LR schedule. Raises ValueError
    with one line naming the setting and the fix."""
    for name in ('batch_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval', 'eval_iters'):
        if s[name] < 1:
            raise ValueError(f"{name}={s[name]} must be >= 1")
    for name in ('max_iters', 'warmup_iters', 'lr_decay_iters', 'min_lr', 'weight_decay', 'grad_clip'):
        if s[name] < 0:
            raise ValueError(f"{name}={s[name]} must be >= 0")
    if not s['learning_rate'] > 0:
        raise ValueError(f"learning_rate={s['learning_rate']} must be > 0")
    for name in ('beta1', 'beta2'):
        if not 0 <= s[name] < 1:
            raise ValueError(f"{name}={s[name]} must be in [0, 1)")
    if s['decay_lr'] and s['warmup_iters'] >= s['lr_decay_iters']:
        raise ValueError(f"warmup_iters={s['warmup_iters']} must be smaller than lr_decay_iters={s['lr_decay_iters']} "
                         f"(warm up, then decay until lr_decay_iters); lower --warmup_iters or raise --lr_decay_iters "
                         f"(usually = max_iters), or set --decay_lr=False")
    if s['bias_update_schedule'] not in ('constant', 'lr'):
        raise ValueError(f"bias_update_schedule must be 'constant' or 'lr', got {s['bias_update_schedule']!r}")
    if s['init_from'] not in ('scratch', 'resume'):
        raise ValueError(f"init_from must be 'scratch' or 'resume', got {s['init_from']!r}")
    ep = s['expert_parallel']
    if ep < 1:
        raise ValueError(f"expert_parallel={ep} must be >= 1 (1 = off)")
    if ep > 1 and s['ffn_type'] == 'dense':
        raise ValueError(f"expert_parallel={ep} splits the routed experts, and ffn_type='dense' has none; "
                         f"use --expert_parallel=1")
    if ep > 1 and s['n_experts'] % ep:
        raise ValueError(f"expert_parallel={ep} must divide n_experts={s['n_experts']}: each rank holds "
                         f"n_experts / expert_parallel routed experts")
    group = s['expert_choice_group']
    if s['routing'] == 'expert_choice' and group > 0 and (s['batch_size'] * s['block_size']) % group:
        raise ValueError(f"expert_choice_group={group} must divide the {s['batch_size'] * s['block_size']} tokens of a "
                         f"batch (batch_size x block_size): e.g. {s['block_size']} for each sequence, or 0 for the batch")


def resume_settings(saved: dict, model_args: dict, argv: list[str], out_dir: str) -> dict:
    """The settings of a resumed run: the checkpoint's saved settings, then what is given now (config files,
    --key=value) on top, in out_dir (where the checkpoint was found). Raises ValueError if a setting that
    fixes the weights' shapes (SHAPE_KEYS) would differ from the checkpoint's model."""
    base = dict(DEFAULTS)
    for key, value in saved.items():
        if key in DEFAULTS:                                  # settings of an older version may be gone
            base[key] = check_value(key, value, DEFAULTS)
    base['out_dir'] = out_dir
    # what one invocation does, not what the run is (expert_parallel: how its processes share the experts; the
    # checkpoint holds them whole, so any number of processes resumes it)
    for key in ('init_from', 'eval_only', 'expert_parallel'):
        base[key] = DEFAULTS[key]
    settings = configure(DEFAULTS, argv, base=base)
    for key in SHAPE_KEYS:
        if key in model_args and settings[key] != model_args[key]:
            raise ValueError(f"{key}={settings[key]!r} differs from the checkpoint's {key}={model_args[key]!r}, and a "
                             f"resumed model cannot change shape; drop that setting (a resumed run takes its settings "
                             f"from the checkpoint), or start a new run with another --out_dir")
    return settings


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state (the moments, the step counts) but keep the hyperparameters the
    optimizer was built with now (weight_decay, betas, fused, ...): load_state_dict alone would bring back the
    old ones. They are merged into the saved groups before loading, so that the state is also placed as the
    groups of now want it (fused AdamW on CUDA keeps its step counts on the GPU)."""
    now = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
    groups = [{**saved, **hyper} for saved, hyper in zip(state['param_groups'], now)]
    optimizer.load_state_dict({**state, 'param_groups': groups})


def get_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float) -> float:
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr. Never divides
    by zero: the cosine branch is only reached when warmup_iters <= it < lr_decay_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))        # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


def bias_update_scale(schedule: str, it: int, lr: float, learning_rate: float, warmup_iters: int) -> float:
    """The factor on the balancing speed gamma at step it. 'constant': 1. 'lr': 1 through the warmup, then the
    learning rate's own decay lr / learning_rate: large steps early, when the routing is far from balanced, small
    ones late, when a large step only makes the load oscillate (DeepSeek-V3 even sets gamma to 0 at the end)."""
    if schedule == 'constant' or it < warmup_iters:
        return 1.0
    return lr / learning_rate


def get_batch(data: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator,
              device: str = 'cpu') -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size windows at random offsets drawn from rng."""
    return windows(data, rng.integers(0, len(data) - block_size - 1, size=batch_size), block_size, device)


def sampler(seed: int, rank: int, iter_num: int) -> np.random.Generator:
    """The data sampler of one optimizer step: a generator seeded by (seed, rank, iteration). Its whole
    state is those three numbers, so a resumed run draws exactly the batches the uninterrupted run would,
    on every DDP rank, without saving generator states."""
    return np.random.default_rng([seed, rank, iter_num])


def step_seed(seed: int, rank: int, iter_num: int) -> int:
    """The torch seed of one optimizer step on one rank (dropout masks, on the CPU and the GPU), set before the
    step's first micro-step: like the sampler a function of (seed, rank, iteration), so a resumed run, on every
    DDP rank, draws the masks the uninterrupted run would, and the checkpoint needs no generator state."""
    return int(np.random.default_rng([seed, rank, iter_num, 1]).integers(2 ** 63))


def duration(seconds: float) -> str:
    """A time span for people: '45s', '12m30s', '3h20m', '4d22h'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def run_vocab_size(requested: int, given: bool, resumed: bool, meta_size: int | None, needed: int,
                   meta_path: str) -> tuple[int, str]:
    """The model's vocab_size and the line that says where it came from. A scratch run on data with a meta.pkl
    (prepare.py --vocab N) takes meta_size unless a vocab_size was given (on the command line, or a value other
    than the default in a config file); a resume keeps the checkpoint's (requested). Raises ValueError if it is smaller than the data needs
    (needed: its largest id + 1). The line is '' for data without a meta.pkl (GPT-2 ids)."""
    size = meta_size if meta_size is not None and not given and not resumed else requested
    if size < needed:
        raise ValueError(f"vocab_size={size} is smaller than the data needs: it holds token ids up to {needed - 1}; "
                         f"use --vocab_size={needed} or more" + (" (or leave it out to take meta.pkl's)" if meta_size else ""))
    if meta_size is None:
        return size, ''
    why = 'the checkpoint\'s' if resumed else 'as given' if given else 'from meta.pkl'
    return size, (f"vocab_size {size} ({why}): {meta_path} holds a compact vocabulary of {meta_size:,} tokens "
                  f"(GPT-2's BPE restricted by prepare.py --vocab)")


def data_id_bound(data_dir: str, data: dict) -> int:
    """The vocabulary size the ids of data without a meta.pkl need: prepare.py's meta.json gives it for GPT-2 ids
    (50,257); other data (made by hand) is scanned for its largest id + 1."""
    path = os.path.join(data_dir, 'meta.json')
    if os.path.isfile(path):
        with open(path) as f:
            size = json.load(f).get('vocab_size')
        if isinstance(size, int):
            return size
    return int(max(split.max() for split in data.values())) + 1


def rounded(values: torch.Tensor, digits: int = 4) -> list:
    """A tensor as a (nested) list of floats rounded for metrics.jsonl."""
    return np.round(values.double().cpu().numpy(), digits).tolist()


def collapse_warning(counts: list[list[float]], maxvio_min: list[float], layers: list[int], threshold: float,
                     first: int, last: int, hint: str) -> str:
    """One line naming every MoE layer whose routing collapsed over the steps first..last-1 (an eval interval), or ''.
    counts (L, E): each expert's token-slots summed over the interval; maxvio_min (L,): the smallest maxvio_batch of
    any of its steps; layers: the block index of each. A layer collapsed if an expert got no tokens at all, or if
    even its most even step had maxvio_batch > threshold (0: never). hint: which settings help (balancing_hint)."""
    problems = []
    for block, layer_counts, low in zip(layers, counts, maxvio_min):
        idle = [e for e, c in enumerate(layer_counts) if c == 0]
        found = []
        if idle:
            found.append(f"expert{'s' if len(idle) > 1 else ''} {', '.join(map(str, idle))} ({len(idle)} of "
                         f"{len(layer_counts)}) got no tokens")
        if threshold > 0 and low > threshold:
            found.append(f"maxvio_batch above {threshold:g} at every step (lowest {low:.2f})")
        if found:
            problems.append(f"layer {block}: " + ' and '.join(found))
    if not problems:
        return ''
    return f"warning: expert collapse in iterations {first}-{last - 1}: " + '; '.join(problems) + f". {hint}"


def balancing_hint(s: dict) -> str:
    """What helps a collapsing router, given the run's settings s: balancing switched on, or made stronger."""
    on = [f"{k}={s[k]:g}" for k in ('bias_update_speed', 'balance_loss_coef', 'aux_loss_coef', 'seq_aux_coef')
          if s[k] > 0]
    if not on:
        return ("Balancing is off: set bias_update_speed (auxiliary-loss-free, e.g. 0.001-0.01) or balance_loss_coef "
                "(the Switch loss, e.g. 0.01); results/balance/README.md compares them")
    return (f"Balancing ({', '.join(on)}) is too weak or too slow here: raise bias_update_speed (auxiliary-loss-free) "
            f"or balance_loss_coef (the Switch loss); results/balance/README.md compares them")


def wandb_scalars(row: dict, layers: list[int]) -> dict[str, float]:
    """The numbers of a metrics.jsonl row as wandb keys: its scalars as they are, and each per-layer list as one key
    per MoE layer, named by block index (maxvio_batch/layer3). An eval row's maxvio_batch and dropped_frac are means
    over the steps since the previous eval: 'eval_' keeps them apart from the train row of the same iteration."""
    out = {k: v for k, v in row.items() if isinstance(v, (int, float))}
    for key in ('maxvio_batch', 'dropped_frac', 'maxvio_global'):
        if key in row:
            name = f"eval_{key}" if row['type'] == 'eval' and key != 'maxvio_global' else key
            out.update({f"{name}/layer{block}": value for block, value in zip(layers, row[key])})
    return out


def all_finite(tensors) -> bool:
    """True if no tensor holds a NaN or an infinity (one host sync for all of them)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


if __name__ == '__main__':
    # -------------------------------------------------------------------------
    # settings: defaults < config files < --key=value; on resume, the checkpoint's settings come first
    ckpt_path = checkpoint = None
    try:
        config = configure(DEFAULTS, sys.argv[1:])
        ckpt_path = os.path.join(config['out_dir'], 'ckpt.pt')
        if config['init_from'] == 'resume':
            checkpoint = read_checkpoint(ckpt_path)
            missing = [k for k in ('optimizer', 'iter_num', 'best_val_loss') if k not in checkpoint]
            if missing:
                raise ValueError(f"{ckpt_path} lacks {missing} and cannot be resumed (sample.py can still use it)")
            config = resume_settings(checkpoint.get('config', {}), checkpoint['model_args'], sys.argv[1:], config['out_dir'])
        check_settings(config)
        GPTConfig(**{k: config[k] for k in MODEL_KEYS})            # the model settings, before the data is opened
        runtime = resolve_runtime(config['device'], config['dtype'], config['compile'], config['moe_dispatch'],
                                  (config['n_embd'], config['expert_hidden']) if config['ffn_type'] != 'dense' else ())
        # the data, and the vocabulary its ids belong to (a compact one if prepare.py --vocab wrote a meta.pkl)
        data_path = resolve_data_dir(config['data_dir'], config['dataset'])
        data = open_data(data_path, config['dataset'], config['block_size'])
        meta_path = os.path.join(data_path, 'meta.pkl')
        meta = read_meta(meta_path) if os.path.isfile(meta_path) else None
        if meta:
            check_ids_fit(data, meta, data_path, config['dataset'])
        gpt2_ids = meta['gpt2_ids'] if meta else None      # recorded in the checkpoint, for sample.py and compare.py
        if checkpoint is not None and checkpoint.get('data', {}).get('gpt2_ids') != gpt2_ids:
            was = checkpoint.get('data', {}).get('gpt2_ids')
            raise ValueError(f"{data_path} holds ids of {'GPT-2' if gpt2_ids is None else f'a {len(gpt2_ids):,}-token compact'} "
                             f"vocabulary, but the checkpoint was trained on {'GPT-2' if was is None else f'a {len(was):,}-token compact'} "
                             f"one; resume on the data it was trained on (--dataset/--data_dir)")
        needed = meta['vocab_size'] if meta else data_id_bound(data_path, data)
        given = any(a.startswith('--vocab_size=') for a in sys.argv[1:]) or config['vocab_size'] != DEFAULTS['vocab_size']
        config['vocab_size'], vocab_line = run_vocab_size(config['vocab_size'], given, checkpoint is not None,
                                                          meta and meta['vocab_size'], needed, meta_path)
        globals().update(config)
        model_args = {k: config[k] for k in MODEL_KEYS}
        device, device_type, dtype, compile = runtime.device, runtime.device_type, runtime.dtype, runtime.compile
        model_args['moe_dispatch'] = runtime.moe_dispatch          # config keeps what was asked ('auto')
        autocast = runtime.autocast()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    # the config files this run was made of (a resume given none keeps the checkpoint's, for compare.py's labels)
    run_files = config_files(sys.argv[1:]) or (checkpoint or {}).get('config_files', [])

    # DDP: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        dist.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo')
        rank, local_rank, world_size = dist.get_rank(), int(os.environ['LOCAL_RANK']), dist.get_world_size()
        if device_type == 'cuda':
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
        if gradient_accumulation_steps % world_size:
            sys.exit(f"error: gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by "
                     f"the number of processes ({world_size})")
        gradient_accumulation_steps //= world_size
    else:
        rank, world_size = 0, 1
    if world_size % expert_parallel:
        sys.exit(f"error: expert_parallel={expert_parallel} must divide the number of processes ({world_size}); "
                 f"start them with torchrun --nproc_per_node=N, N a multiple of {expert_parallel}")
    if expert_parallel > 1 and runtime.grad_scaler:
        sys.exit(f"error: expert_parallel needs --dtype=bfloat16 or float32, not {dtype}: float16's loss scaler skips "
                 f"a step when a gradient overflows, and under expert parallelism each rank sees only its own experts'")
    master = rank == 0
    tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size
    # the initial weights (DDP then copies rank 0's to every rank; under expert parallelism every rank builds the same
    # full model from the seed and keeps its slice of the experts)
    torch.manual_seed(seed)
    if runtime.tf32:                     # a float32 run on CUDA only: never the router of a bf16/fp16 run
        torch.backends.cuda.matmul.allow_tf32 = True

    # -------------------------------------------------------------------------
    # data, model, optimizer, checkpoint
    metrics_path = os.path.join(out_dir, 'metrics.jsonl')
    try:
        if init_from == 'scratch' and os.path.exists(ckpt_path):
            raise ValueError(f"{ckpt_path} already holds a checkpoint; continue it with --init_from=resume, "
                             f"or choose another --out_dir (nothing was overwritten)")
        if checkpoint is not None:      # the checkpoint's weights in a model built with the settings of now
            model = model_from_checkpoint(checkpoint, ckpt_path, **model_args)
        else:
            model = GPT(GPTConfig(**model_args))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    ep_group = replica_group = None
    if expert_parallel > 1:             # cut before moving: only this rank's experts reach its device
        ep_group, replica_group = expert_groups(expert_parallel)
        keep_local_experts(model, ep_group)
    model.to(device, dtype=torch.float64 if dtype == 'float64' else None)
    iter_num, best_val_loss, scaler_state, tokens_seen = 0, float('inf'), None, 0
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
    if checkpoint is not None:
        optimizer_state = checkpoint['optimizer']
        if ep_group is not None:        # the checkpoint holds the experts' moments whole: this rank's slice of them
            optimizer_state = local_optimizer_state(optimizer_state, optimizer, model, ep_group)
        load_optimizer_state(optimizer, optimizer_state)
        iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
        # the tokens trained on so far: a resume may change the batch size, so they are counted, not derived
        tokens_seen = checkpoint.get('tokens_seen', iter_num * tokens_per_iter)
        if 'scaler' in checkpoint and runtime.grad_scaler:
            scaler_state = checkpoint['scaler']
        checkpoint = None                                       # free memory
    scaler = torch.amp.GradScaler(device_type, enabled=runtime.grad_scaler)     # float16: loss scaling
    if scaler_state:
        scaler.load_state_dict(scaler_state)                     # the scale it had reached, for an exact resume
    raw_model = model
    if compile:
        model = torch.compile(model)
    # evaluation runs on rank 0 only, never through DDP's collectives; under expert parallelism every rank evaluates
    # (the same batches), as every rank holds some of the experts
    eval_model = model
    if ddp and ep_group is None:
        # the balancing biases are buffers kept equal on all ranks by the all-reduced counts: no broadcast
        model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None, broadcast_buffers=False)
    # under expert parallelism no DDP wrapper: it would average the expert gradients over all ranks, a wrong update;
    # expert_parallel.sync_gradients makes both kinds of gradient DDP's after the backward
    moe_layers = len(raw_model.moe_layer_ids())
    counts_shape = (moe_layers, raw_model.config.n_experts if moe_layers else 0)
    layer_ids = raw_model.moe_layer_ids()          # block index of each MoE layer: names it in wandb and warnings
    peak_flops = gpu_peak_flops(device) if device_type == 'cuda' else None
    params = raw_model.param_counts()

    @torch.no_grad()
    def estimate_loss() -> tuple[dict[str, float], torch.Tensor]:
        """Mean pure cross-entropy over eval_iters batches of each split, in eval mode (dropless and causal MoE), and
        the expert counts (n_moe_layers, E) of the validation batches. The batches come from a generator seeded
        the same way at every eval, so successive evals (and runs) see the same text. An expert-choice model is
        also evaluated the leaky way, routed by expert choice over each batch as in training ('val_leaky')."""
        out, val_counts = {}, torch.zeros(counts_shape, device=device)
        eval_model.eval()
        passes = [('train', nullcontext()), ('val', nullcontext())]
        if routing == 'expert_choice':
            passes.append(('val_leaky', raw_model.leaky_expert_choice()))
        for name, mode in passes:
            rng = np.random.default_rng(1234)
            losses = torch.zeros(eval_iters)
            with mode:
                for k in range(eval_iters):
                    X, Y = get_batch(data[name.removesuffix('_leaky')], batch_size, block_size, rng, device)
                    with autocast:
                        _, _, aux = eval_model(X, Y, return_aux=True)
                    losses[k] = aux['ce_loss'].item()
                    if name == 'val':
                        val_counts += aux['expert_counts']
            out[name] = losses.mean().item()
        eval_model.train()
        return out, val_counts

    def write_metrics(row: dict) -> None:
        with open(metrics_path, 'a') as f:
            f.write(json.dumps(row) + '\n')
        if wandb_log:
            log = wandb_scalars(row, layer_ids)
            if row['type'] == 'eval' and 'expert_counts' in row:
                # each expert's share of the layer's token-slots since the previous eval, as a histogram over
                # expert ids (wandb shows how it changes from eval to eval)
                for block, counts in zip(layer_ids, row['expert_counts']):
                    shares = np.asarray(counts) / max(sum(counts), 1)
                    log[f"expert_share/layer{block}"] = wandb.Histogram(
                        np_histogram=(shares, np.arange(len(counts) + 1)))
            wandb.log(log, step=row['iter'])

    def stop(message: str) -> None:
        """End this process with the message. Under DDP every rank calls it at the same point (the decision is
        shared first: agreed(), the all-reduced step loss), so no rank is left waiting in a collective."""
        sys.exit(f"error: {message}; stopping. The last good checkpoint (if any) is untouched in {ckpt_path}; "
                 f"try a lower learning_rate or grad_clip")

    def agreed(failure: str, save: bool) -> tuple[str, bool]:
        """Under several processes, one verdict of an evaluation for every rank: the first failure a rank found ('' = go
        on) and rank 0's decision to save. Under DDP only rank 0 evaluates; under expert parallelism every rank does,
        checks its own experts, and takes part in gathering the checkpoint."""
        if ddp:
            verdicts = [None] * world_size
            dist.all_gather_object(verdicts, (failure, save))
            failure, save = next((f for f, _ in verdicts if f), ''), verdicts[0][1]
        return failure, save

    if master:
        os.makedirs(out_dir, exist_ok=True)
        if init_from == 'scratch' and os.path.exists(metrics_path):
            os.remove(metrics_path)                             # metrics of an abandoned run without checkpoint
        if wandb_log:
            import wandb
            wandb.init(project=wandb_project, name=wandb_run_name, config=config)
        write_metrics({'type': 'config', 'iter': iter_num, 'config': config, 'config_files': run_files,
                       'model_args': model_args, 'total_params': params['total'], 'active_params': params['active'],
                       'tokens_per_iter': tokens_per_iter, 'world_size': world_size, 'device': device,
                       'data_dir': data_path, 'data_vocab_size': meta['vocab_size'] if meta else None,
                       'dtype': dtype, 'runtime': {**asdict(runtime), 'device': device}})
        print(runtime.summary(moe=bool(moe_layers)))
        if vocab_line:
            print(vocab_line)
        print(f"{raw_model.config.ffn_type}: {params['total'] / 1e6:.2f}M parameters, {params['active'] / 1e6:.2f}M "
              f"active; {tokens_per_iter:,} tokens per iteration")
        if ep_group is not None:
            held = sum(p.numel() for p in expert_params(raw_model))
            print(f"expert parallel: {world_size // expert_parallel} group(s) of {expert_parallel} ranks; each rank "
                  f"holds {n_experts // expert_parallel} of the {n_experts} routed experts of every MoE layer "
                  f"({held:,} of {held * expert_parallel:,} expert parameters)")

    # -------------------------------------------------------------------------
    # the training loop
    # since the last eval: expert load (token-slots), the sum of every step's MaxVio, dropped share
    eval_counts = torch.zeros(counts_shape, device=device)
    eval_maxvio, eval_dropped, eval_steps = torch.zeros(moe_layers, device=device), torch.zeros(moe_layers, device=device), 0
    eval_maxvio_min = torch.full((moe_layers,), math.inf, device=device)     # each layer's most even step
    t_start = time.time()
    t_last_eval, iter_last_eval, tokens_last_eval = time.time(), iter_num, tokens_seen
    resumed_at = iter_num if init_from == 'resume' else -1
    t0, iter_t0 = time.time(), iter_num               # the log window: ms/iter = time since t0 / steps since iter_t0
    # the run-time estimate: iterations [first_iter + 1, first_iter + 4) of this process, after one warm-up
    first_iter, t_timed, eval_s = iter_num, None, None
    while True:
        lr = get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr) if decay_lr else learning_rate
        for group in optimizer.param_groups:
            group['lr'] = lr

        # evaluate and checkpoint, every eval_interval and at the end (not again right after a resume); rank 0
        # evaluates, and every rank learns its verdict
        last = iter_num >= max_iters
        if eval_only or ((iter_num % eval_interval == 0 or last) and iter_num != resumed_at):
            failure, save = '', False
            if master or ep_group is not None:
                elapsed = time.time() - t_last_eval
                losses, val_counts = estimate_loss()
                save = (losses['val'] < best_val_loss or always_save_checkpoint or last) and not eval_only and iter_num > 0
                if not (math.isfinite(losses['train']) and math.isfinite(losses['val'])):
                    failure = (f"non-finite loss at the evaluation of iteration {iter_num} (train {losses['train']}, "
                               f"val {losses['val']}); nothing was saved")
                elif save and not all_finite(raw_model.state_dict().values()):
                    failure = f"non-finite weights at iteration {iter_num}; nothing was saved"
            failure, save = agreed(failure, save)
            if failure:
                stop(failure)
            # expert parallelism: the checkpoint's experts (weights, moments) gathered whole to rank 0, all sending
            full_state = full_checkpoint_state(raw_model, optimizer, ep_group) if save and ep_group is not None else None
            if master:
                row = {'type': 'eval', 'iter': iter_num, 'tokens': tokens_seen,
                       'train_loss': round(losses['train'], 5), 'val_loss': round(losses['val'], 5), 'lr': lr,
                       'elapsed_s': round(time.time() - t_start, 2),
                       'tokens_per_s': round((tokens_seen - tokens_last_eval) / elapsed, 1) if iter_num > iter_last_eval else None}
                if eval_only:
                    row['eval_only'] = True       # a look at a checkpoint, not part of the run's own curve
                if 'val_leaky' in losses:
                    # expert choice: val_loss routes each token by itself (causal, the number to compare);
                    # val_loss_leaky routes by expert choice over each batch as in training, reading later tokens
                    row['val_loss_leaky'] = round(losses['val_leaky'], 5)
                    row['eval_routing'] = "val_loss: token by token (causal); val_loss_leaky: expert choice over the batch"
                if peak_flops and iter_num > iter_last_eval:
                    row['mfu'] = round(raw_model.estimate_mfu(batch_size * gradient_accumulation_steps,
                                                              elapsed / (iter_num - iter_last_eval), peak_flops), 4)
                if moe_layers:
                    # Wang et al. 2024 / DeepSeek-V3: MaxVio_global on the validation batches of this eval, per layer
                    row['maxvio_global'] = rounded(max_vio(val_counts))
                    row['val_expert_counts'] = val_counts.tolist()
                    if eval_steps:            # the training steps since the last eval
                        row['expert_counts'] = eval_counts.tolist()
                        row['maxvio_batch'] = rounded(eval_maxvio / eval_steps)     # mean of the per-step MaxVio
                        row['dropped_frac'] = rounded(eval_dropped / eval_steps, 5)
                        warning = collapse_warning(row['expert_counts'], eval_maxvio_min.tolist(), layer_ids,
                                                   warn_maxvio, iter_num - eval_steps, iter_num, balancing_hint(config))
                        if warning:
                            row['warning'] = warning
                write_metrics(row)
                print(f"eval {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                      + (f" (leaky: {losses['val_leaky']:.4f})" if 'val_leaky' in losses else "")
                      + (f", maxvio_global {np.mean(row['maxvio_global']):.3f}" if moe_layers else "")
                      + (f", maxvio_batch {np.mean(row['maxvio_batch']):.3f}" if 'maxvio_batch' in row else ""))
                if 'warning' in row:
                    print(row['warning'])
                # the checkpoint holds the best model so far, and the last one at the end (to resume from);
                # an eval_only run only looks. Tensors, numbers, strings, lists and dicts only: it loads with
                # torch.load(weights_only=True), so opening one never runs code (model.read_checkpoint)
                if save:
                    best_val_loss = min(best_val_loss, losses['val'])
                    model_state, optimizer_state = full_state or (raw_model.state_dict(), optimizer.state_dict())
                    save_checkpoint({
                        'model': model_state, 'optimizer': optimizer_state,
                        'model_args': model_args, 'iter_num': iter_num, 'best_val_loss': best_val_loss,
                        'tokens_seen': tokens_seen, 'config': config, 'config_files': run_files,
                        # the data and the vocabulary of its ids (None: GPT-2's): sample.py decodes with it
                        'data': {'dataset': dataset, 'data_dir': data_path, 'gpt2_ids': gpt2_ids},
                        'scaler': scaler.state_dict(),
                        'sampler': {'seed': seed, 'iter_num': iter_num},   # see sampler() and step_seed()
                    }, ckpt_path)
                if not (compile and iter_num == first_iter):          # the first compiled eval also compiles
                    eval_s = time.time() - t_last_eval - elapsed
                t_last_eval, iter_last_eval, tokens_last_eval = time.time(), iter_num, tokens_seen
                t0, iter_t0 = time.time(), iter_num                  # keep eval time out of ms/iter
                if t_timed is not None:
                    t_timed += eval_s                                # nor in the run-time estimate
            eval_counts.zero_()
            eval_maxvio.zero_()
            eval_maxvio_min.fill_(math.inf)
            eval_dropped.zero_()
            eval_steps = 0
        if eval_only:
            break
        if last:
            break

        # one optimizer step = gradient_accumulation_steps micro-steps
        step_counts = torch.zeros(counts_shape, device=device)
        step_dropped = torch.zeros(moe_layers, device=device)
        step_losses = torch.zeros(3, device=device)            # the step's mean cross-entropy, aux loss, objective
        rng = sampler(seed, rank, iter_num)
        torch.manual_seed(step_seed(seed, rank, iter_num))     # this step's dropout masks
        for micro_step in range(gradient_accumulation_steps):
            X, Y = get_batch(data['train'], batch_size, block_size, rng, device)
            # DDP: all-reduce the gradients only on the last micro-step (expert parallelism: sync_gradients, below)
            sync = not ddp or ep_group is not None or micro_step == gradient_accumulation_steps - 1
            with (nullcontext() if sync else model.no_sync()), autocast:
                _, loss, aux = model(X, Y, return_aux=True)
                loss = loss / gradient_accumulation_steps        # the mean over micro-steps
            scaler.scale(loss).backward()
            step_losses += torch.stack([aux['ce_loss'].detach().float(), aux['aux_loss'].detach().float(),
                                        loss.detach().float() * gradient_accumulation_steps]) / gradient_accumulation_steps
            step_counts += aux['expert_counts']
            step_dropped += aux['dropped_frac'] / gradient_accumulation_steps
        if ep_group is not None:
            sync_gradients(raw_model, replica_group, world_size)   # every gradient DDP's (expert_parallel.py)
        if ddp:          # the mean over all ranks; a NaN on any rank reaches every rank, so all stop together
            dist.all_reduce(step_losses)
            step_losses /= world_size
        lossf, aux_lossf, objective = step_losses.tolist()      # one host sync per step: stop on NaN at once
        if not (math.isfinite(lossf) and math.isfinite(objective)):
            stop(f"non-finite loss at iteration {iter_num} (lr {lr:.2e})")
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            if ep_group is not None:     # the norm of the whole model's gradient, the experts of every rank in it
                clip_gradients(raw_model, grad_clip, ep_group)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        # auxiliary-loss-free balancing: one bias update from the whole step's load, the same on every rank
        if moe_layers:
            if ddp:
                dist.all_reduce(step_counts)
                dist.all_reduce(step_dropped)
                step_dropped /= world_size                       # the dropped share of the whole step
            raw_model.update_moe_biases(step_counts, bias_update_scale(bias_update_schedule, iter_num, lr,
                                                                       learning_rate, warmup_iters))
            step_maxvio = max_vio(step_counts)             # MaxVio_batch of this step (all ranks), per layer
            eval_counts += step_counts
            eval_maxvio += step_maxvio
            torch.minimum(eval_maxvio_min, step_maxvio, out=eval_maxvio_min)
            eval_dropped += step_dropped
            eval_steps += 1

        iter_num += 1
        tokens_seen += tokens_per_iter
        if master and iter_num == first_iter + 1:
            t_timed = time.time()
        if master and iter_num == first_iter + 4 and iter_num < max_iters:
            per_iter = (time.time() - t_timed) / 3
            n_evals = (max_iters - 1) // eval_interval - (iter_num - 1) // eval_interval + 1   # the last included
            total = per_iter * (max_iters - iter_num) + (eval_s or 0) * n_evals
            line = (f"timing: {per_iter:.2f} s/iter over 3 iterations: about {duration(total)} for the "
                    f"{max_iters - iter_num:,} iterations left" + (' and their evals' if eval_s else ' (evals not counted)'))
            if device_type != 'cuda' and total > 3600:
                line += (f". This config is sized for a GPU; on a {device_type.upper()}, put config/tinystories_cpu.py "
                         f"first" + (' and add --device=mps' if device_type == 'mps' else '')
                         + " (4 layers, 128 wide, 1,000 iterations of 2,048 tokens on a 4,096-token vocabulary made by "
                         "python data/tinystories/prepare.py --vocab 4096: minutes, not days)")
            print(line)
        if iter_num % log_interval == 0 and master:
            t1 = time.time()
            dt = (t1 - t0) / (iter_num - iter_t0)            # the steps timed: an eval or a resume may start a window
            t0, iter_t0 = t1, iter_num
            row = {'type': 'train', 'iter': iter_num, 'tokens': tokens_seen, 'loss': round(lossf, 5),
                   'aux_loss': round(aux_lossf, 6), 'lr': lr, 'ms_per_iter': round(1000 * dt, 2),
                   'tokens_per_s': round(tokens_per_iter / dt, 1)}
            line = (f"iter {iter_num}/{max_iters}: loss {lossf:.4f}, {1000 * dt:.1f} ms/iter, {tokens_per_iter / dt:,.0f} tok/s, "
                    f"eta {duration(dt * (max_iters - iter_num))}")
            if peak_flops:
                row['mfu'] = round(raw_model.estimate_mfu(batch_size * gradient_accumulation_steps, dt, peak_flops), 4)
                line += f", mfu {100 * row['mfu']:.1f}%"
            if moe_layers:
                row['maxvio_batch'] = rounded(step_maxvio)
                row['dropped_frac'] = rounded(step_dropped, 5)
                line += f", maxvio_batch {np.mean(row['maxvio_batch']):.3f}"
                if raw_model.config.capacity_factor > 0:
                    line += f", dropped {100 * step_dropped.mean().item():.1f}%"
            write_metrics(row)
            print(line)

    # -------------------------------------------------------------------------
    # the end: expert selection on a fixed validation batch (the comparison's histograms), dropless
    if (master or ep_group is not None) and moe_layers and not eval_only:        # EP: every rank holds some experts
        offsets = np.linspace(0, len(data['val']) - block_size - 1, batch_size).astype(np.int64)  # fixed windows
        X, Y = windows(data['val'], offsets, block_size, device)
        eval_model.eval()
        with torch.no_grad(), autocast:
            _, _, aux = eval_model(X, Y, return_aux=True)
        if master:
            write_metrics({'type': 'expert_selection', 'iter': iter_num, 'layers': raw_model.moe_layer_ids(),
                           'tokens': X.numel(), 'counts': aux['expert_counts'].tolist()})
    if master and wandb_log:
        wandb.finish()             # flush now: a run started inside another program (a test) ends here, not at its exit
    if ddp:
        if moe_layers:   # the all-reduced counts must have kept every rank's biases identical
            bias = torch.stack([m.expert_bias for m in raw_model.moe_layers()])
            gathered = [torch.zeros_like(bias) for _ in range(world_size)]
            dist.all_gather(gathered, bias)
            assert all(torch.equal(g, gathered[0]) for g in gathered), "balancing biases differ across ranks"
            if master:
                print(f"balancing biases identical on all {world_size} ranks")
        dist.barrier()             # every rank done with gloo/NCCL before any tears the group down
        del model                  # DDP's reducer holds the group: free it now, not at interpreter exit
        gc.collect()
        dist.destroy_process_group()
