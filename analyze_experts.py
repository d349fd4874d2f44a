"""
What the trained experts learned: DeepSeekMoE's two mechanisms measured on checkpoints, the way its paper measured
them (Dai et al. 2024, arXiv 2401.06066, sec. 4.5), with the routing analyses of OLMoE (arXiv 2409.02060) and
Mixtral (arXiv 2401.04088) beside. compare.py is about the runs' metrics; this script opens the models.

    python analyze_experts.py out-study/cpu/deepseek_moe-s1 out-study/cpu/moe-s1 ... --out results/experts

The two claims it tests. Fine-grained segmentation (many small experts, more of them per token) is said to cure
knowledge *hybridity*: each expert specialises more. Shared experts (every token sees them) are said to cure
knowledge *redundancy*: the routed experts stop relearning what every token needs.

Runs are grouped by their settings as compare.py groups them (runs that differ only in the seed form a group); every
run is evaluated on the same fixed windows of its own validation data, in eval mode (dropless and causal), and never
written to. Per group: the mean over seeds and, with 2+ seeds, a 95% t interval (compare.mean_interval).

  1 redundancy      mask, for every token, the r routed experts of highest selection score (s + b for DeepSeekMoE,
                    the router probability otherwise), route to the top-k of the rest with the layer's own gate rule;
                    val loss and its rise over r = 0 at r / E = 0, 1/16, 1/8, 3/16, 1/4 (r rounded to the nearest
                    whole expert). DeepSeekMoE Fig. 4: a steeper rise = less redundant routed experts.
  2 shared_off      shared experts off with k + n_shared routed experts instead (the same compute), and off alone.
                    DeepSeekMoE sec. 4.5: Pile loss 1.808 -> 2.414.
  3 k_eval          val loss with 1 ... k routed experts per token at evaluation (DeepSeekMoE Fig. 5).
  4 vocab_specialization
                    per layer, by input token and by next token: for every token id seen >= 10 times, the share of its
                    occurrences whose top-k holds its most frequent expert (OLMoE eq. 8, maximised over experts),
                    averaged over ids, and normalised (p - k/E) / (1 - k/E) so that 8 and 30 experts compare; beside it
                    the same with the ids shuffled over the tokens (what the load alone gives).
  5 coactivation    C(i, j) = N(i and j) / N(i) over all pairs of a token's top-k (OLMoE eq. 6); random routing gives
                    (k - 1) / (E - 1) for every pair. Heatmaps of each group's first run (expert numbers are not
                    comparable across seeds), the strongest pairs in the tables.
  6 similarity      every routed expert of a layer on the same tokens: mean pairwise cosine of the outputs and mean
                    pairwise linear CKA (Kornblith et al. 2019); where a layer has shared experts, the mean cosine of
                    each routed expert's output with theirs.
  7 consecutive     how often tokens t and t+1 share their first expert, and share any expert (Mixtral Table 5),
                    beside random routing (1/E; 1 - C(E-k, k) / C(E, k)) and the load-matched baseline (the same
                    routings paired with a random other token).

Writes to --out: summary.json (those seven keys, and 'runs'), summary.md (the tables, also printed), redundancy.png
(loss rise against the masked ratio, the headline), k_eval.png, specialization.png, similarity.png, coactivation.png,
and runs/<run>.json, each run's own measures with the checkpoint hash and settings they came from: an analysis run
again computes only the runs that are new or changed.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from compare import group_runs, mean_interval, pair_stats, run_label  # noqa: E402
from dataset import read_meta, resolve_data_dir, windows  # noqa: E402
from model import GPT, model_from_checkpoint, read_checkpoint  # noqa: E402
from moe import MoE, expert_load  # noqa: E402

MASK_RATIOS = (0, 1 / 16, 1 / 8, 3 / 16, 1 / 4)      # DeepSeekMoE Fig. 4's ratios of disabled top routed experts
MIN_COUNT = 10                                        # token ids seen fewer times are left out of the specialisation
MEASURES = ('redundancy', 'shared_off', 'k_eval', 'vocab_specialization', 'coactivation', 'similarity', 'consecutive')


# -----------------------------------------------------------------------------
# opening a run: checked, one line per problem


def open_run(run_dir: str, data_dir: str = '') -> tuple[GPT, dict, np.ndarray]:
    """The model of run_dir/ckpt.pt (CPU, eval mode), its checkpoint and its validation tokens. Raises ValueError or
    FileNotFoundError with one line for a run without a checkpoint, a dense run, or data of another vocabulary."""
    ckpt_path = os.path.join(run_dir, 'ckpt.pt')
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"{run_dir} holds no ckpt.pt: analyze_experts.py reads trained checkpoints; train the "
                                f"run first (results/experts/study.sh trains the study's runs)")
    ckpt = read_checkpoint(ckpt_path)               # torch.load(weights_only=True): reads, never runs code or writes
    if ckpt['model_args'].get('ffn_type', 'dense') == 'dense':
        raise ValueError(f"{run_dir} is a dense run: it has no experts to analyse; give moe or deepseek_moe runs")
    model = model_from_checkpoint(ckpt, ckpt_path, moe_dispatch='auto')
    model.eval()                                    # dropless, causal routing, no dropout
    cfg, data = ckpt.get('config', {}), ckpt.get('data', {})
    folder = data_dir or data.get('data_dir') or resolve_data_dir(cfg.get('data_dir', ''), cfg.get('dataset', ''))
    if not os.path.isdir(folder) and not data_dir:  # the run was trained in another checkout: this one's data/
        folder = resolve_data_dir('', data.get('dataset') or cfg.get('dataset', ''))
    val_path = os.path.join(folder, 'val.bin')
    if not os.path.isfile(val_path):
        raise FileNotFoundError(f"{val_path} not found: {run_dir} was trained on {data.get('dataset') or cfg.get('dataset')!r}; "
                                f"prepare it (data/<name>/prepare.py) or give its folder with --data_dir")
    meta_path = os.path.join(folder, 'meta.pkl')
    have = read_meta(meta_path)['gpt2_ids'] if os.path.isfile(meta_path) else None
    want = data.get('gpt2_ids')
    if have != want:
        def name(ids):
            return 'GPT-2 ids' if ids is None else f"a {len(ids):,}-token compact vocabulary"
        raise ValueError(f"{folder} holds {name(have)}, but {run_dir} was trained on {name(want)}; give the data it was "
                         f"trained on with --data_dir (or prepare it: data/<name>/prepare.py"
                         f"{'' if want is None else f' --vocab {len(want)}'})")
    val = np.memmap(val_path, dtype=np.uint16, mode='r')
    if int(val.max()) >= model.config.vocab_size:
        raise ValueError(f"{val_path} holds token id {int(val.max())}, outside {run_dir}'s vocabulary of "
                         f"{model.config.vocab_size}; give the data it was trained on with --data_dir")
    return model, ckpt, val


def fixed_windows(val: np.ndarray, n_windows: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n_windows windows of block_size tokens evenly spaced over the validation split (the same for every run of the
    same data), and their next tokens: (n_windows, T) each."""
    if len(val) < block_size + 2:
        raise ValueError(f"the validation split holds {len(val)} tokens, fewer than one window of {block_size} + 1")
    offsets = np.linspace(0, len(val) - block_size - 1, n_windows).astype(np.int64)
    return windows(val, offsets, block_size)


# -----------------------------------------------------------------------------
# evaluating a trained layer with other experts chosen


def masked_topk(layer: MoE, x: torch.Tensor, k: int, masked: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every token of x (N, C): drop the `masked` routed experts of highest selection score, choose the top-k of
    the rest, and gate them by the layer's own rule (MoE.gate_values). -> gates (N, k), idx (N, k).
    masked = 0, k = top_k is exactly the layer's own routing (MoE.route)."""
    scores, logits = layer.router_scores(x)
    rank = layer.selection_scores(scores)                                 # s + b (DeepSeekMoE), s otherwise
    if masked:
        top = rank.topk(masked, dim=-1).indices                           # (N, r) the experts disabled for this token
        rank = rank.scatter(1, top, float('-inf'))
    idx = rank.topk(k, dim=-1).indices                                    # (N, k) TopK of the remaining experts
    return layer.gate_values(scores, logits, idx), idx


def intervened_output(layer: MoE, x: torch.Tensor, k: int, masked: int, shared: bool) -> tuple[torch.Tensor, dict]:
    """The layer's forward (y, aux) for x (B, T, C) with its routing changed: the top-k experts left after masking the
    top `masked` (k = 0: no routed expert at all), shared experts on or off. Eval mode: dropless, no dropout, no
    auxiliary loss."""
    B, T, C = x.shape
    xf = x.reshape(B * T, C)                                              # (B, T, C) -> (N, C)
    if k == 0:
        y, load = torch.zeros_like(xf), xf.new_zeros(layer.n_experts, dtype=torch.float32)
    else:
        gates, idx = masked_topk(layer, xf, k, masked)
        load = expert_load(idx, layer.n_experts)
        y, _ = layer.dispatch(xf, gates, idx, load)
    if shared and layer.shared_experts is not None:
        y = y + layer.shared_experts(xf)
    zero = xf.new_zeros((), dtype=torch.float32)
    return y.view(B, T, C), {'aux_loss': zero, 'expert_counts': load, 'dropped_frac': zero}


@contextlib.contextmanager
def intervention(model: GPT, k: int | None = None, k_delta: int = 0, masked_ratio: float = 0.0, shared: bool = True):
    """Within it, every MoE layer of model computes intervened_output instead of its own forward: k routed experts per
    token (None: the layer's top_k; 0: none), plus k_delta, after masking round(masked_ratio * E) experts, shared
    experts on or off. The rest of the model runs its own forward around it. (The replacement is an instance attribute
    `forward`, which shadows the class's method until it is deleted.)"""
    def replaced(layer: MoE):
        masked = masked_experts(masked_ratio, layer.n_experts)
        k_layer = (layer.top_k if k is None else k) + k_delta
        return lambda x: intervened_output(layer, x, k_layer, masked, shared)
    layers = model.moe_layers()
    for layer in layers:
        layer.forward = replaced(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def masked_experts(ratio: float, n_experts: int) -> int:
    """r = the ratio of E rounded to the nearest whole expert, halves up (1/16 of 8 experts is 1, of 30 is 2)."""
    return int(math.floor(ratio * n_experts + 0.5))


@torch.no_grad()
def val_loss(model: GPT, X: torch.Tensor, Y: torch.Tensor, batch: int) -> float:
    """Mean pure cross-entropy over the windows X -> Y, batch windows at a time (every batch the same size but the
    last: weighted by its windows)."""
    total = 0.0
    for i in range(0, len(X), batch):
        _, _, aux = model(X[i:i + batch], Y[i:i + batch], return_aux=True)
        total += aux['ce_loss'].item() * len(X[i:i + batch])
    return total / len(X)


@torch.no_grad()
def layer_inputs(model: GPT, X: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """The input of every MoE layer (the normalised residual stream) for the windows X: per layer (N, C), N = B*T."""
    layers = model.moe_layers()
    captured = [[] for _ in layers]
    handles = [layer.register_forward_pre_hook(lambda m, inp, i=i: captured[i].append(inp[0].reshape(-1, inp[0].shape[-1])))
               for i, layer in enumerate(layers)]
    try:
        for i in range(0, len(X), batch):
            model(X[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(c) for c in captured]


# -----------------------------------------------------------------------------
# the routing measures: small pure functions (tests check them by hand)


def chosen_experts(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """A[t, i] = 1 if expert i is among token t's chosen experts. idx (N, k) -> (N, E) float32."""
    return torch.zeros(idx.shape[0], n_experts).scatter_(1, idx, 1.0)


def vocab_specialization(ids: torch.Tensor, idx: torch.Tensor, n_experts: int, min_count: int = MIN_COUNT) -> dict:
    """OLMoE eq. 8 per token id x and expert i: N_x(i) / N_x, the share of x's occurrences whose top-k holds i. For
    every id seen >= min_count times, p_x = max_i N_x(i) / N_x (its most frequent expert); returned: the mean of p_x
    over those ids, the normalised (mean - k/E) / (1 - k/E) (0 = routing that ignores the token, 1 = every id always to
    one expert), and the number of ids. ids (N,) token ids, idx (N, k) their chosen experts."""
    k = idx.shape[1]
    vocab = int(ids.max()) + 1
    n_x = torch.bincount(ids, minlength=vocab).float()                       # N_x
    n_xi = torch.zeros(vocab, n_experts).index_put_((ids[:, None].expand_as(idx), idx), torch.ones(idx.shape),
                                                     accumulate=True)        # (V, E) N_x(i)
    seen = n_x >= min_count
    if not seen.any():
        return {'p': None, 'normalized': None, 'ids': 0}
    p = (n_xi[seen].max(1).values / n_x[seen]).mean().item()
    base = k / n_experts
    return {'p': p, 'normalized': (p - base) / (1 - base), 'ids': int(seen.sum())}


def coactivation(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """OLMoE eq. 6: C(i, j) = N(i and j) / N(i), N counting the tokens whose chosen experts hold i (and j), over all
    pairs of a token's top-k. (N, k) -> (E, E), NaN on the diagonal and in the rows of experts never chosen."""
    a = chosen_experts(idx, n_experts)
    both = a.T @ a                                                           # (E, E) N(i and j); diagonal N(i)
    c = both / both.diagonal()[:, None]
    c.fill_diagonal_(float('nan'))
    return c


def coactivation_summary(c: torch.Tensor, k: int) -> dict:
    """The numbers of a co-activation matrix: the largest C(i, j), the mean over experts of each one's strongest
    partner max_j C(i, j), and random routing's (k - 1) / (E - 1) they compare with."""
    E = c.shape[0]
    partner = torch.nan_to_num(c, nan=-1.0).max(1).values                    # (E,) max_j C(i, j)
    used = partner >= 0
    return {'max': partner.max().item() if used.any() else None,
            'mean_strongest_partner': partner[used].mean().item() if used.any() else None,
            'uniform': (k - 1) / (E - 1) if E > 1 else None}


def strongest_pairs(c: torch.Tensor, n: int = 3) -> list[tuple[int, int, float]]:
    """The n largest C(i, j) as (i, j, value)."""
    flat = torch.nan_to_num(c, nan=-1.0).flatten()
    top = flat.topk(min(n, flat.numel())).indices.tolist()
    E = c.shape[0]
    return [(i // E, i % E, flat[i].item()) for i in top if flat[i] >= 0]


def expert_outputs(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every routed expert on every token, ungated: expert_e(x) = (silu(x W_gate_e^T) * (x W_up_e^T)) W_down_e^T.
    x (N, C) -> (E, N, C)."""
    # e: expert, n: token, c: model width, h: expert width
    h = F.silu(torch.einsum('nc,ehc->enh', x, layer.w_gate)) * torch.einsum('nc,ehc->enh', x, layer.w_up)
    return torch.einsum('enh,ech->enc', h, layer.w_down)


def mean_pairwise_cosine(outs: torch.Tensor) -> float:
    """Mean over tokens and expert pairs i < j of cos(out_i(x), out_j(x)). outs (E, N, C)."""
    u = F.normalize(outs, dim=-1)
    cos = torch.einsum('enc,fnc->efn', u, u).mean(-1)                        # (E, E) mean cosine over tokens
    E = outs.shape[0]
    pairs = torch.triu_indices(E, E, offset=1)
    return cos[pairs[0], pairs[1]].mean().item()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019, eq. 5 with linear kernels) of two representations of the same N examples,
    x (N, p), y (N, q): ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) after centring every column. 1 for representations
    equal up to rotation and scale; near 0 for independent ones."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    cross = (y.T @ x).pow(2).sum()
    return (cross / ((x.T @ x).norm() * (y.T @ y).norm())).item()


def mean_pairwise_cka(outs: torch.Tensor) -> float:
    """Mean linear CKA over expert pairs i < j. outs (E, N, C). linear_cka for all pairs at once: the columns centred
    and ||X_e^T X_e||_F computed once per expert, the cross terms ||X_j^T X_i||_F^2 one batched matmul per expert."""
    E = outs.shape[0]
    xc = outs - outs.mean(1, keepdim=True)                                   # (E, N, C) every column centred
    xt = xc.transpose(1, 2)                                                  # (E, C, N)
    self_norm = (xt @ xc).flatten(1).norm(dim=1)                             # (E,) ||X_e^T X_e||_F
    values = []
    for i in range(E - 1):
        cross = (xt[i + 1:] @ xc[i]).pow(2).sum((1, 2))                      # (E-i-1,) ||X_j^T X_i||_F^2, j > i
        values.append(cross / (self_norm[i] * self_norm[i + 1:]))
    return torch.cat(values).mean().item()


def consecutive(idx: torch.Tensor, seq_len: int, n_experts: int, seed: int = 0) -> dict:
    """Mixtral Table 5: how often tokens t and t+1 of one sequence share their first expert (the highest-ranked, idx[:, 0])
    and share any chosen expert. idx (N, k), N = sequences * seq_len, sequences one after another. Beside them, random
    routing: 1/E and 1 - C(E-k, k) / C(E, k); and load-matched: each token paired with a random other token instead of
    its successor (the same loads, no order)."""
    k = idx.shape[1]
    a = chosen_experts(idx, n_experts)
    first = idx[:, 0]
    t = torch.arange(idx.shape[0] - 1)
    t = t[(t + 1) % seq_len != 0]                                            # t and t + 1 in the same sequence
    g = torch.Generator().manual_seed(seed)
    other = torch.randperm(idx.shape[0], generator=g)[t]                     # a random partner for every t
    return {
        'first': (first[t] == first[t + 1]).float().mean().item(),
        'any': ((a[t] * a[t + 1]).sum(1) > 0).float().mean().item(),
        'first_random': 1 / n_experts,
        'any_random': 1 - math.comb(n_experts - k, k) / math.comb(n_experts, k),
        'first_load_matched': (first[t] == first[other]).float().mean().item(),
        'any_load_matched': ((a[t] * a[other]).sum(1) > 0).float().mean().item(),
    }


# -----------------------------------------------------------------------------
# one run


def analyze_run(model: GPT, X: torch.Tensor, Y: torch.Tensor, batch: int, sim_tokens: int, tick=lambda name: None) -> dict:
    """Every measure of one model on the windows X -> Y (n_windows, T). tick(name) is called after each measure."""
    layers, ids = model.moe_layers(), model.moe_layer_ids()
    E, k, n_shared = layers[0].n_experts, layers[0].top_k, model.config.n_shared_experts
    out = {'layers': ids, 'n_experts': E, 'top_k': k, 'n_shared': n_shared, 'tokens': X.numel()}
    with intervention(model):
        base = val_loss(model, X, Y, batch)
    out['val_loss'] = base

    # the routed experts' whole contribution: the loss with none of them (the shared experts alone, or no FFN at all
    # in the MoE layers of a model without shared experts); a rise is also given as a share of it
    with intervention(model, k=0):
        routed_off = val_loss(model, X, Y, batch)
    out['routed_off'] = routed_off
    rows = []
    for ratio in MASK_RATIOS:
        r = masked_experts(ratio, E)
        if r + k > E:
            continue                                     # fewer than k experts would be left
        with intervention(model, masked_ratio=ratio):
            loss = base if r == 0 else val_loss(model, X, Y, batch)
        rows.append({'ratio': ratio, 'masked': r, 'masked_share': r / E, 'val_loss': loss, 'rise': loss - base,
                     'rise_share': (loss - base) / (routed_off - base)})
    out['redundancy'] = rows
    tick('redundancy')

    if n_shared:
        with intervention(model, shared=False, k_delta=n_shared):
            plus = val_loss(model, X, Y, batch)
        with intervention(model, shared=False):
            alone = val_loss(model, X, Y, batch)
        out['shared_off'] = {'k_routed_plus_shared': k + n_shared, 'val_loss_plus': plus, 'rise_plus': plus - base,
                             'val_loss_off': alone, 'rise_off': alone - base}
    tick('shared_off')

    out['k_eval'] = []
    for k_eval in range(1, k + 1):
        with intervention(model, k=k_eval):
            loss = base if k_eval == k else val_loss(model, X, Y, batch)
        out['k_eval'].append({'k': k_eval, 'val_loss': loss, 'rise': loss - base})
    tick('k_eval')

    inputs = layer_inputs(model, X, batch)                  # per layer (N, C)
    with torch.no_grad():
        routed = [layer.route(x)[1] for layer, x in zip(layers, inputs)]     # per layer (N, k), as the model routes
    spec = []
    for layer_id, idx in zip(ids, routed):
        perm = torch.randperm(X.numel(), generator=torch.Generator().manual_seed(0))
        row = {'layer': layer_id}
        for by, tokens in (('input', X.reshape(-1)), ('next', Y.reshape(-1))):
            s = vocab_specialization(tokens, idx, E)
            shuffled = vocab_specialization(tokens[perm], idx, E)
            row[by] = {**s, 'shuffled_normalized': shuffled['normalized']}
        spec.append(row)
    out['vocab_specialization'] = spec
    tick('vocab_specialization')

    co = []
    for layer_id, idx in zip(ids, routed):
        c = coactivation(idx, E)
        co.append({'layer': layer_id, **coactivation_summary(c, k), 'pairs': strongest_pairs(c),
                   'matrix': np.round(np.nan_to_num(c.numpy(), nan=0.0), 4).tolist()})
    out['coactivation'] = co
    tick('coactivation')

    sim = []
    with torch.no_grad():
        for layer_id, layer, x in zip(ids, layers, inputs):
            xs = x[torch.linspace(0, len(x) - 1, min(sim_tokens, len(x))).long()]     # evenly spaced tokens
            outs = expert_outputs(layer, xs)
            row = {'layer': layer_id, 'cosine': mean_pairwise_cosine(outs), 'cka': mean_pairwise_cka(outs)}
            if layer.shared_experts is not None:
                shared_out = F.normalize(layer.shared_experts(xs), dim=-1)
                row['shared_cosine'] = (F.normalize(outs, dim=-1) * shared_out).sum(-1).mean().item()
            sim.append(row)
    out['similarity'] = sim
    tick('similarity')

    out['consecutive'] = [{'layer': layer_id, **consecutive(idx, X.shape[1], E)} for layer_id, idx in zip(ids, routed)]
    tick('consecutive')
    return out


# -----------------------------------------------------------------------------
# over seeds: a group's mean and 95% interval, differences between groups


def stat(values: list[float]) -> dict:
    """Mean over seeds, 95% t interval [low, high] (None with one value), and the values; mean None if any is None
    (a measure that had nothing to count in some run)."""
    if any(v is None for v in values):
        return {'mean': None, 'ci95': None, 'values': values}
    mean, half = mean_interval(values)
    return {'mean': mean, 'ci95': None if half is None else [mean - half, mean + half], 'values': values}


def layer_mean(rows: list[dict], *keys: str) -> float | None:
    """The mean over layers of rows[layer][keys[0]][keys[1]]...; None if any is None."""
    values = []
    for row in rows:
        for key in keys:
            row = row[key]
        values.append(row)
    return None if any(v is None for v in values) else float(np.mean(values))


def summarize(groups: list[dict]) -> dict:
    """The seven measures per group (mean and interval over its runs), ready for summary.json."""
    summary = {m: [] for m in MEASURES}
    for g in groups:
        res = [r['result'] for r in g['runs']]
        head = {'group': g['name'], 'seeds': [r['seed'] for r in g['runs']], 'n_experts': res[0]['n_experts'],
                'top_k': res[0]['top_k'], 'n_shared': res[0]['n_shared']}
        for i, row in enumerate(res[0]['redundancy']):
            summary['redundancy'].append({**head, 'ratio': row['ratio'], 'masked': row['masked'],
                                          'masked_share': row['masked_share'],
                                          'val_loss': stat([r['redundancy'][i]['val_loss'] for r in res]),
                                          'rise': stat([r['redundancy'][i]['rise'] for r in res]),
                                          'rise_share': stat([r['redundancy'][i]['rise_share'] for r in res]),
                                          'routed_off_rise': stat([r['routed_off'] - r['val_loss'] for r in res])})
        if res[0].get('shared_off'):
            so = [r['shared_off'] for r in res]
            summary['shared_off'].append({**head, 'val_loss': stat([r['val_loss'] for r in res]),
                                          'k_routed_plus_shared': so[0]['k_routed_plus_shared'],
                                          **{key: stat([s[key] for s in so]) for key in
                                             ('val_loss_plus', 'rise_plus', 'val_loss_off', 'rise_off')}})
        for i, row in enumerate(res[0]['k_eval']):
            summary['k_eval'].append({**head, 'k': row['k'], 'val_loss': stat([r['k_eval'][i]['val_loss'] for r in res]),
                                      'rise': stat([r['k_eval'][i]['rise'] for r in res])})
        for li, layer in enumerate(res[0]['layers']):
            spec = [r['vocab_specialization'][li] for r in res]
            summary['vocab_specialization'].append({**head, 'layer': layer, 'ids': spec[0]['input']['ids'], **{
                f"{by}_{key}": stat([s[by][key] for s in spec])
                for by in ('input', 'next') for key in ('p', 'normalized', 'shuffled_normalized')}})
            co = [r['coactivation'][li] for r in res]
            summary['coactivation'].append({**head, 'layer': layer, 'uniform': co[0]['uniform'],
                                            'max': stat([c['max'] for c in co]),
                                            'mean_strongest_partner': stat([c['mean_strongest_partner'] for c in co]),
                                            'first_run': g['runs'][0]['name'], 'pairs': co[0]['pairs'],
                                            'matrix': co[0]['matrix']})
            sim = [r['similarity'][li] for r in res]
            summary['similarity'].append({**head, 'layer': layer, 'cosine': stat([s['cosine'] for s in sim]),
                                          'cka': stat([s['cka'] for s in sim]),
                                          **({'shared_cosine': stat([s['shared_cosine'] for s in sim])}
                                             if 'shared_cosine' in sim[0] else {})})
            con = [r['consecutive'][li] for r in res]
            summary['consecutive'].append({**head, 'layer': layer, **{key: stat([c[key] for c in con]) for key in
                                          ('first', 'any', 'first_load_matched', 'any_load_matched')},
                                           'first_random': con[0]['first_random'], 'any_random': con[0]['any_random']})
    summary['pairs'] = group_pairs(groups)
    summary['k_eval_pairs'] = k_eval_pairs(groups)
    return summary


# per-run numbers the groups are compared by (paired by seed where they share seeds, compare.pair_stats)
PAIR_NUMBERS = {
    'rise at r/E = 1/4': lambda r: r['redundancy'][-1]['rise'] if r['redundancy'][-1]['ratio'] == 0.25 else None,
    'rise at r/E = 1/4, share of the routed experts\' contribution':
        lambda r: r['redundancy'][-1]['rise_share'] if r['redundancy'][-1]['ratio'] == 0.25 else None,
    'mean pairwise cosine (layer mean)': lambda r: layer_mean(r['similarity'], 'cosine'),
    'mean pairwise CKA (layer mean)': lambda r: layer_mean(r['similarity'], 'cka'),
    'specialisation by input, normalised (layer mean)': lambda r: layer_mean(r['vocab_specialization'], 'input', 'normalized'),
    'specialisation by next token, normalised (layer mean)':
        lambda r: layer_mean(r['vocab_specialization'], 'next', 'normalized'),
}


def group_pairs(groups: list[dict]) -> list[dict]:
    """Every two groups' difference a - b in each PAIR_NUMBERS number, with a 95% interval over seeds."""
    pairs = []
    for name, number in PAIR_NUMBERS.items():
        for a, b in [(a, b) for i, a in enumerate(groups) for b in groups[i + 1:]]:
            va = [(r['seed'], number(r['result'])) for r in a['runs']]
            vb = [(r['seed'], number(r['result'])) for r in b['runs']]
            if any(v is None for _, v in va + vb):
                continue
            p = pair_stats(va, vb)
            pairs.append({'measure': name, 'a': a['name'], 'b': b['name'], 'mean_diff': p['mean_diff'],
                          'ci95': p['ci95'], 'method': p['method'], 'seeds_agree': p['seeds_agree'],
                          'n_seeds': p['n_seeds']})
    return pairs


def k_eval_pairs(groups: list[dict]) -> list[dict]:
    """DeepSeekMoE Fig. 5's question, for every two groups a and b: how few of its routed experts a needs at evaluation
    to match b's own loss. Rows: a's val loss with k_eval experts minus b's with all of its own, for every k_eval of a,
    with a 95% interval over seeds (paired where the seeds are shared); 'matches' marks the smallest k_eval whose mean
    difference is <= 0."""
    rows = []
    for a in groups:
        for b in groups:
            if a is b:
                continue
            vb = [(r['seed'], r['result']['val_loss']) for r in b['runs']]
            first = True
            for i, row in enumerate(a['runs'][0]['result']['k_eval']):
                p = pair_stats([(r['seed'], r['result']['k_eval'][i]['val_loss']) for r in a['runs']], vb)
                matches = first and p['mean_diff'] <= 0
                first = first and not matches
                rows.append({'a': a['name'], 'b': b['name'], 'k': row['k'], 'top_k': a['runs'][0]['result']['top_k'],
                             'mean_diff': p['mean_diff'], 'ci95': p['ci95'], 'method': p['method'],
                             'seeds_agree': p['seeds_agree'], 'n_seeds': p['n_seeds'], 'matches': matches})
    return rows


# -----------------------------------------------------------------------------
# tables and figures


def fmt(s: dict | None, digits: int = 3) -> str:
    """'0.123 [0.100, 0.146]' (mean and 95% interval over seeds), the mean alone for one seed, '-' for none."""
    if s is None or s['mean'] is None:
        return '-'
    if s['ci95'] is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} [{s['ci95'][0]:.{digits}f}, {s['ci95'][1]:.{digits}f}]"


def markdown(summary: dict, n_tokens: int) -> str:
    """summary.md: every measure's table."""
    lines = [f"# What the experts learned ({n_tokens:,} validation tokens per run)", "",
             "Mean over seeds [95% t interval]; a group of one run has no interval.", "",
             "## 1. Redundancy: the r routed experts of highest selection score masked for every token (DeepSeekMoE Fig. 4)", "",
             "Share of the routed experts' contribution: the rise over the rise with no routed expert at all (the shared "
             "experts alone, or no FFN in the MoE layers without them; the last column).", "",
             "| group | E | top-k | ratio | masked r (r/E) | val loss | rise over r = 0 | share of the routed experts' "
             "contribution | rise with no routed expert |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in summary['redundancy']:
        lines.append(f"| {row['group']} | {row['n_experts']} | {row['top_k']} | {row['ratio']:.4g} | {row['masked']} "
                     f"({row['masked_share']:.3f}) | {fmt(row['val_loss'])} | {fmt(row['rise'])} | "
                     f"{fmt(row['rise_share'])} | {fmt(row['routed_off_rise'])} |")
    lines += ["", "## 2. Shared experts off (DeepSeekMoE sec. 4.5: Pile loss 1.808 -> 2.414 with one more routed expert)",
              "", "| group | val loss | off, k + n_shared routed | rise | off alone | rise |", "|---|---:|---:|---:|---:|---:|"]
    for row in summary['shared_off']:
        lines.append(f"| {row['group']} | {fmt(row['val_loss'])} | {fmt(row['val_loss_plus'])} (k = {row['k_routed_plus_shared']}) "
                     f"| {fmt(row['rise_plus'])} | {fmt(row['val_loss_off'])} | {fmt(row['rise_off'])} |")
    lines += ["", "## 3. Fewer routed experts at evaluation (DeepSeekMoE Fig. 5)", "",
              "| group | k at evaluation | val loss | rise over the trained k |", "|---|---:|---:|---:|"]
    for row in summary['k_eval']:
        lines.append(f"| {row['group']} | {row['k']} of {row['top_k']} | {fmt(row['val_loss'])} | {fmt(row['rise'])} |")
    lines += ["", "## 4. Vocabulary specialisation (OLMoE eq. 8): the share of a token id's occurrences whose top-k holds "
              "its most frequent expert, mean over ids seen >= 10 times; normalised (p - k/E) / (1 - k/E); shuffled: the "
              "same with the ids shuffled over the tokens", "",
              "| group | layer | ids | by input: p | normalised | shuffled | by next token: p | normalised | shuffled |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in summary['vocab_specialization']:
        lines.append(f"| {row['group']} | {row['layer']} | {row['ids']} | {fmt(row['input_p'])} | {fmt(row['input_normalized'])} "
                     f"| {fmt(row['input_shuffled_normalized'])} | {fmt(row['next_p'])} | {fmt(row['next_normalized'])} "
                     f"| {fmt(row['next_shuffled_normalized'])} |")
    lines += ["", "## 5. Co-activation (OLMoE eq. 6): C(i, j) = N(i and j) / N(i); random routing (k-1)/(E-1)", "",
              "| group | layer | random | largest C(i, j) | mean strongest partner | strongest pairs of the first run (i, j: C) |",
              "|---|---:|---:|---:|---:|---|"]
    for row in summary['coactivation']:
        pairs = ', '.join(f"{i}, {j}: {v:.2f}" for i, j, v in row['pairs'])
        lines.append(f"| {row['group']} | {row['layer']} | {row['uniform']:.3f} | {fmt(row['max'])} | "
                     f"{fmt(row['mean_strongest_partner'])} | {row['first_run']}: {pairs} |")
    lines += ["", "## 6. Expert output similarity: every routed expert on the same tokens", "",
              "| group | layer | mean pairwise cosine | mean pairwise linear CKA | cosine with the shared experts |",
              "|---|---:|---:|---:|---:|"]
    for row in summary['similarity']:
        lines.append(f"| {row['group']} | {row['layer']} | {fmt(row['cosine'])} | {fmt(row['cka'])} | "
                     f"{fmt(row.get('shared_cosine'))} |")
    lines += ["", "## 7. Consecutive tokens (Mixtral Table 5): t and t+1 share ...", "",
              "| group | layer | first expert | random | load-matched | any expert | random | load-matched |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in summary['consecutive']:
        lines.append(f"| {row['group']} | {row['layer']} | {fmt(row['first'])} | {row['first_random']:.3f} | "
                     f"{fmt(row['first_load_matched'])} | {fmt(row['any'])} | {row['any_random']:.3f} | "
                     f"{fmt(row['any_load_matched'])} |")
    lines += ["", "How few routed experts a group needs at evaluation to match another's loss with all of its own: the "
              "smallest k at evaluation whose mean difference is <= 0 (DeepSeekMoE Fig. 5: 4 of its 7 routed experts "
              "matched GShard).", "", "| a with k routed experts - b with all its own | k | difference | 95% interval | seeds |",
              "|---|---:|---:|---:|---|"]
    pairs = {(p['a'], p['b']) for p in summary['k_eval_pairs']}
    for a, b in sorted(pairs, key=lambda ab: [p['a'] for p in summary['k_eval_pairs']].index(ab[0])):
        rows = [p for p in summary['k_eval_pairs'] if (p['a'], p['b']) == (a, b)]
        p = next((p for p in rows if p['matches']), None)
        if p is None:
            lines.append(f"| {a} - {b} | none of 1-{rows[-1]['k']} | {rows[-1]['mean_diff']:.3f} (at k = {rows[-1]['k']}) | - | - |")
        else:
            ci = '-' if p['ci95'] is None else f"[{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]"
            seeds = f"{p['seeds_agree']}/{p['n_seeds']} same sign" if p['method'] == 'paired' else p['method']
            lines.append(f"| {a} - {b} | {p['k']} of {p['top_k']} | {p['mean_diff']:.3f} | {ci} | {seeds} |")
    lines += ["", "## Differences between groups (a - b, 95% interval over seeds; paired by seed where they share seeds)", "",
              "| measure | a - b | difference | 95% interval | seeds |", "|---|---|---:|---:|---|"]
    for p in summary['pairs']:
        ci = '-' if p['ci95'] is None else f"[{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]"
        seeds = f"{p['seeds_agree']}/{p['n_seeds']} same sign" if p['method'] == 'paired' else p['method']
        lines.append(f"| {p['measure']} | {p['a']} - {p['b']} | {p['mean_diff']:.3f} | {ci} | {seeds} |")
    return '\n'.join(lines) + '\n'


def errorbar_args(s: dict) -> tuple[float, list[list[float]]]:
    """The mean and the asymmetric error of a stat for plt.errorbar (no bar for one seed; NaN, not drawn, for none)."""
    if s['mean'] is None:
        return math.nan, [[0.0], [0.0]]
    if s['ci95'] is None:
        return s['mean'], [[0.0], [0.0]]
    return s['mean'], [[s['mean'] - s['ci95'][0]], [s['ci95'][1] - s['mean']]]


def group_label(row: dict, seeds: int) -> str:
    """'deepseek_moe (5 seeds; E=30, k=6, 2 shared)'."""
    shared = f", {row['n_shared']} shared" if row['n_shared'] else ''
    return f"{row['group']} ({seeds} seed{'s' if seeds > 1 else ''}; E={row['n_experts']}, k={row['top_k']}{shared})"


def plot_lines(rows: list[dict], x_key: str, panels: list[tuple[str, str]], xlabel: str, title: str, path: str) -> None:
    """One line per group of rows[x_key] against a stat rows[y_key] with its 95% intervals, one panel per
    (y_key, ylabel)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (y_key, ylabel) in zip(axes[0], panels):
        for name in dict.fromkeys(r['group'] for r in rows):
            mine = [r for r in rows if r['group'] == name]
            ys, errs = zip(*(errorbar_args(r[y_key]) for r in mine))
            ax.errorbar([r[x_key] for r in mine], ys, yerr=np.hstack(errs), marker='o', capsize=3,
                        label=group_label(mine[0], len(mine[0][y_key]['values'])))
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_layers(rows: list[dict], keys: list[tuple[str, str]], ylabel: str, title: str, path: str,
                reference: str | None = None) -> None:
    """Per layer, one bar per group for each (key, panel title) with its 95% interval; reference: a key of rows drawn as
    a dash over each bar (a baseline)."""
    groups = list(dict.fromkeys(r['group'] for r in rows))
    layers = sorted({r['layer'] for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    width = 0.8 / len(groups)
    for ax, (key, panel) in zip(axes[0], keys):
        for gi, name in enumerate(groups):
            mine = {r['layer']: r for r in rows if r['group'] == name}
            xs = [li + gi * width for li in range(len(layers))]
            ys, errs = zip(*(errorbar_args(mine[layer][key]) for layer in layers))
            ax.bar(xs, ys, width, yerr=np.hstack(errs), capsize=2, label=name)
            ref_key = key.replace('normalized', 'shuffled_normalized') if reference == 'shuffled' else None
            if ref_key and ref_key in mine[layers[0]]:
                ax.hlines([mine[layer][ref_key]['mean'] for layer in layers], [x - width / 2 for x in xs],
                          [x + width / 2 for x in xs], colors='k', linewidth=1.5)
        ax.set_xticks([li + 0.4 - width / 2 for li in range(len(layers))], [f"layer {layer}" for layer in layers])
        ax.set(title=panel, ylabel=ylabel)
        ax.grid(alpha=0.3, axis='y')
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_coactivation(rows: list[dict], path: str) -> None:
    """The first run's co-activation matrix of every group (rows) and layer (columns)."""
    groups = list(dict.fromkeys(r['group'] for r in rows))
    layers = sorted({r['layer'] for r in rows})
    fig, axes = plt.subplots(len(groups), len(layers), figsize=(3.2 * len(layers), 3 * len(groups)), squeeze=False)
    for gi, name in enumerate(groups):
        for li, layer in enumerate(layers):
            row = next(r for r in rows if r['group'] == name and r['layer'] == layer)
            ax = axes[gi][li]
            im = ax.imshow(np.array(row['matrix']), vmin=0, vmax=1, cmap='viridis', interpolation='nearest')
            ax.set_title(f"{row['first_run']}, layer {layer}\nrandom {row['uniform']:.2f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.6, label='C(i, j) = N(i and j) / N(i)   (row i, column j)')
    fig.savefig(path, dpi=100, bbox_inches='tight')
    plt.close(fig)


def write_outputs(summary: dict, runs: list[dict], out: str, n_tokens: int) -> str:
    os.makedirs(out, exist_ok=True)
    summary = {**summary, 'runs': runs, 'tokens_per_run': n_tokens}
    with open(os.path.join(out, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    text = markdown(summary, n_tokens)
    with open(os.path.join(out, 'summary.md'), 'w') as f:
        f.write(text)
    plot_lines(summary['redundancy'], 'masked_share',
               [('rise', 'validation loss rise over r = 0'),
                ('rise_share', "rise / rise with no routed expert at all")],
               'masked routed experts r / E (each token\'s top r by selection score)',
               'Redundancy: the top routed experts masked (DeepSeekMoE Fig. 4); 95% intervals over seeds',
               os.path.join(out, 'redundancy.png'))
    plot_lines(summary['k_eval'], 'k', [('val_loss', 'validation loss')], 'routed experts per token at evaluation',
               'Fewer routed experts at evaluation (DeepSeekMoE Fig. 5)', os.path.join(out, 'k_eval.png'))
    plot_layers(summary['vocab_specialization'], [('input_normalized', 'by input token'), ('next_normalized', 'by next token')],
                '(p - k/E) / (1 - k/E)', 'Vocabulary specialisation (OLMoE eq. 8), normalised; dash: ids shuffled',
                os.path.join(out, 'specialization.png'), reference='shuffled')
    plot_layers(summary['similarity'], [('cosine', 'mean pairwise cosine'), ('cka', 'mean pairwise linear CKA')],
                'similarity of routed experts', 'Expert output similarity on the same tokens (lower = less redundant)',
                os.path.join(out, 'similarity.png'))
    plot_coactivation(summary['coactivation'], os.path.join(out, 'coactivation.png'))
    return text


# -----------------------------------------------------------------------------


def file_sha256(path: str) -> str:
    """The SHA-256 of a file (read only)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def cached_result(path: str, key: dict) -> dict | None:
    """The measures a previous analysis stored at path, if they were computed from exactly key (the checkpoint's hash
    and the analysis' settings); None otherwise."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return stored['result'] if stored.get('key') == key else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', help="run directories holding ckpt.pt (moe or deepseek_moe)")
    parser.add_argument('--out', default='experts_out', help="where summary.json, summary.md and the figures go")
    parser.add_argument('--windows', type=int, default=256, help="fixed validation windows of block_size tokens per run")
    parser.add_argument('--batch', type=int, default=32, help="windows per forward pass")
    parser.add_argument('--sim_tokens', type=int, default=2048, help="tokens every expert is run on for the similarity")
    parser.add_argument('--data_dir', default='', help="the validation data (default: the run's own, from its checkpoint)")
    args = parser.parse_args()
    runs = []
    try:
        for run_dir in args.runs:       # check every run before the first is analysed
            model, ckpt, val = open_run(run_dir, args.data_dir)
            cfg = ckpt.get('config', {})
            runs.append({'dir': run_dir, 'name': os.path.basename(os.path.normpath(run_dir)), 'seed': cfg.get('seed'),
                         'label': run_label({'config_files': ckpt.get('config_files'), 'model_args': ckpt['model_args']}),
                         'config': {'config': cfg, 'dtype': cfg.get('dtype')}, 'iter': ckpt.get('iter_num')})
            del model, ckpt, val
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    groups = group_runs(runs)
    with tqdm(total=len(runs) * len(MEASURES), desc='runs x measures', unit='measure') as bar:
        for run in runs:
            bar.set_postfix_str(run['name'])
            # each run's measures are kept in --out/runs/<name>.json with what they were computed from, so that a
            # rerun (more seeds, a study cut off) computes only what is new or changed
            key = {'ckpt_sha256': file_sha256(os.path.join(run['dir'], 'ckpt.pt')), 'windows': args.windows,
                   'sim_tokens': args.sim_tokens, 'data_dir': args.data_dir}
            cache = os.path.join(args.out, 'runs', f"{run['name']}.json")
            run['result'] = cached_result(cache, key)
            if run['result'] is None:
                torch.manual_seed(0)
                model, _, val = open_run(run['dir'], args.data_dir)
                X, Y = fixed_windows(val, args.windows, model.config.block_size)
                run['result'] = analyze_run(model, X, Y, args.batch, args.sim_tokens,
                                            tick=lambda name: (bar.set_postfix_str(f"{run['name']}: {name}"), bar.update(1)))
                os.makedirs(os.path.dirname(cache), exist_ok=True)
                with open(cache, 'w') as f:
                    json.dump({'key': key, 'result': run['result']}, f)
            else:
                bar.update(len(MEASURES))
    n_tokens = runs[0]['result']['tokens']
    summary = summarize(groups)
    listed = [{'dir': r['dir'], 'group': g['name'], 'seed': r['seed'], 'iter': r['iter'], 'val_loss': r['result']['val_loss']}
              for g in groups for r in g['runs']]
    print(write_outputs(summary, listed, args.out, n_tokens))
    print(f"wrote {args.out}/summary.md, summary.json, redundancy.png, k_eval.png, specialization.png, similarity.png, "
          f"coactivation.png")


if __name__ == '__main__':
    main()
