"""
Compare training runs: validation loss, expert load, and which experts tokens are routed to. Runs that
differ only in their seed (and in settings that do not change the experiment, IGNORED_SETTINGS)
form a group, summarised over its seeds.

    python compare.py                                  # every out*/ run dir here -> compare_out/
    python compare.py out-dense-s1 out-dense-s2 out-deepseek_moe-s1 out-deepseek_moe-s2 --out results
    python compare.py --routing out-deepseek_moe --text "Once upon a time, Lily found a red ball."

Writes to --out:
  val_loss.png          each group's mean validation loss, min-max band over its seeds, single runs faint
  maxvio.png            the same for the two load-imbalance measures of Wang et al. 2024 / DeepSeek-V3:
                        maxvio_batch (per training step) and maxvio_global (over the validation batches),
                        with random routing's MaxVio dotted (uniform_maxvio)
  expert_selection.png  per MoE group and layer, the mean share of token-slots per expert, min-max over seeds
  tradeoff.png          the balance trade-off (Wang et al. 2024, Fig. 1): final val loss against final
                        maxvio_global and maxvio_batch, one point per MoE group (mean over seeds, 95% interval
                        of the loss, min-max of the MaxVio), marked by how it balances (balancing_kind), random
                        routing's MaxVio dotted; written for two or more MoE groups
  summary.md            the group table, the differences of final val loss between every two comparable
                        groups with a 95% interval over seeds, and for two or more MoE groups the balance
                        trade-off (all also printed). Groups are comparable when they differ only in the FFN's
                        own settings (FFN_SETTINGS) and the seed; other pairs get a warning naming the settings
                        that differ, and no difference. Expert-choice groups also get their final val loss
                        evaluated both ways, causal and leaky (leak_row)
  summary.json          the same numbers for scripts: {"groups": [...], "pairs": [...], "not_compared": [...],
                        "tradeoff": [...], "expert_choice": [...]} (tradeoff: one row per MoE group, tradeoff_row;
                        expert_choice: one per expert-choice group, leak_row)
Every number comes from the runs' metrics.jsonl (written by train.py); losses are pure cross-entropy.
--routing loads a checkpoint and writes routing.png (token x expert gate values in one layer) and
top_tokens.md (the most frequent tokens each expert receives on validation data).
"""

import argparse
import glob
import itertools
import json
import math
import os
import re
import statistics
import sys
from collections import Counter

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


# -----------------------------------------------------------------------------
# reading runs


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl; a line that is not valid JSON (a run killed mid-write) is skipped
    with a warning. A missing file reads as no rows."""
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"warning: {path}:{n} is not valid JSON (truncated?); skipped", file=sys.stderr)
    return rows


def describe_model(model_args: dict) -> str:
    """The FFN in a few words, e.g. 'dense 512' or 'deepseek_moe, 2 shared + 30 routed, top-6'."""
    ffn = model_args['ffn_type']
    if ffn == 'dense':
        return f"dense {model_args['ffn_hidden']}"
    shared = f"{model_args['n_shared_experts']} shared + " if model_args['n_shared_experts'] else ''
    return f"{ffn}, {shared}{model_args['n_experts']} routed, top-{model_args['top_k']}"


def run_label(config_row: dict) -> str:
    """What a run is called in the figures and tables: the stem of its last config file
    (config/tinystories_cpu.py config/deepseek_moe.py -> 'deepseek_moe'); runs without config files
    (older runs, or settings given only as --key=value) are described by their model."""
    files = config_row.get('config_files')
    if files:
        return os.path.splitext(os.path.basename(files[-1]))[0]
    return describe_model(config_row['model_args'])


def split_looks(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The rows of the run itself and those of its eval_only looks, each in the order written. A look
    (python train.py --init_from=resume --out_dir=X --eval_only=True) appends a config row whose settings
    have eval_only True and an eval row at the checkpoint's iteration, after no training steps (so without
    maxvio_batch, dropped_frac or expert_counts). A row is a look's if it says so ("eval_only": true in its
    eval row, which newer runs write) or follows a look's config row (older runs), up to the next config row."""
    own, looks = [], []
    in_look = False
    for r in rows:
        if r.get('type') == 'config':
            in_look = bool(r.get('config', {}).get('eval_only'))
        (looks if in_look or r.get('eval_only') else own).append(r)
    return own, looks


def merge_per_iter(rows: list[dict]) -> list[dict]:
    """One row per iteration, in iteration order. A run killed between two checkpoints and resumed logs the
    steps after its last checkpoint twice; the second time counts: rows of one iteration are merged in the
    order written, the later row's values winning and the keys it lacks keeping the earlier row's values."""
    merged = {}
    for r in rows:
        merged[r['iter']] = {**merged.get(r['iter'], {}), **r}
    return sorted(merged.values(), key=lambda r: r['iter'])


def load_run(run_dir: str) -> dict | None:
    """A run's rows grouped by type, its latest config row (a resumed run appends one), its seed and
    label; None (with a warning) if unusable. 'dir' is run_dir as given. The rows of eval_only looks
    (split_looks) are left out: a look changes neither the run's settings, label, curves nor final numbers."""
    path = os.path.join(run_dir, 'metrics.jsonl')
    rows, looks = split_looks(read_metrics(path))
    configs = [r for r in rows if r.get('type') == 'config']
    evals = [r for r in rows if r.get('type') == 'eval' and r.get('val_loss') is not None]
    if not configs or not evals:
        only_looks = ' (only eval_only looks)' if looks else ''
        print(f"warning: {path} is missing or has no config/eval rows{only_looks}; run skipped", file=sys.stderr)
        return None
    cfg = configs[-1]
    named = [c for c in configs if c.get('config_files')] or [cfg]     # a resume may have been given no files
    trains = [r for r in rows if r.get('type') == 'train']
    return {
        'dir': run_dir, 'name': os.path.basename(os.path.normpath(run_dir)), 'label': run_label(named[-1]),
        'seed': cfg.get('config', {}).get('seed'), 'config': cfg, 'ffn_type': cfg['model_args']['ffn_type'],
        'evals': merge_per_iter(evals), 'train': merge_per_iter(trains),
        'selection': next((r for r in reversed(rows) if r.get('type') == 'expert_selection'), None),
    }


# -----------------------------------------------------------------------------
# grouping: runs of the same experiment with different seeds

# Settings that do not change the experiment, left out when deciding whether two runs are seeds of one
# group: the seed itself, where and how a run is saved, logged or resumed, and how the same model is
# computed (torch.compile, the MoE dispatch path, the device, the experts split over processes: expert_parallel's
# updates are DDP's). Every other setting must be equal.
IGNORED_SETTINGS = ('seed', 'out_dir', 'init_from', 'eval_only', 'always_save_checkpoint', 'log_interval',
                    'wandb_log', 'wandb_project', 'wandb_run_name', 'compile', 'moe_dispatch', 'device',
                    'expert_parallel')


def differing_settings(configs: list[dict]) -> list[str]:
    """The settings (sorted) whose values are not equal in all configs, IGNORED_SETTINGS left out. The
    keys of all configs are compared; a config missing a key counts as None there."""
    keys = sorted(set().union(*configs) - set(IGNORED_SETTINGS))
    return [k for k in keys if any(c.get(k) != configs[0].get(k) for c in configs[1:])]


# The FFN's own settings: what a comparison of FFNs varies (its type and widths, the experts and their routing,
# the balancing losses and biases). Two groups are compared (the difference of their final val loss) only if
# they differ in nothing but these and IGNORED_SETTINGS (the seed among them): the same data, steps, tokens per
# step, model outside the FFN, optimizer and dtype. Otherwise a difference mixes the FFN with everything else.
FFN_SETTINGS = ('ffn_type', 'ffn_hidden', 'n_dense_layers', 'n_experts', 'top_k', 'expert_hidden', 'n_shared_experts',
                'capacity_factor', 'score_func', 'aux_loss_coef', 'balance_loss_coef', 'z_loss_coef', 'seq_aux_coef',
                'bias_update_speed', 'bias_update_rule', 'bias_update_schedule', 'bias_recenter', 'routing',
                'expert_choice_group')


def incomparable_settings(a: dict, b: dict) -> list[str]:
    """The settings (sorted) in which two groups' settings differ outside FFN_SETTINGS and IGNORED_SETTINGS:
    why the two cannot be compared; [] if they can."""
    return [k for k in differing_settings([a, b]) if k not in FFN_SETTINGS]


def not_compared_text(a_name: str, b_name: str, a: dict, b: dict, keys: list[str]) -> str:
    """Why two groups are not compared: 'deepseek_moe and moe differ in max_iters (40 vs 4), n_embd (128 vs 384):
    not compared' (a setting one of them lacks shows as None)."""
    values = ', '.join(f"{k} ({a.get(k)} vs {b.get(k)})" for k in keys)
    return f"{a_name} and {b_name} differ in {values}: not compared"


def count_label(seeds: list) -> str:
    """'1 run', '3 seeds' (distinct seeds), or '3 runs' (seeds repeated or unknown)."""
    if len(seeds) == 1:
        return '1 run'
    distinct = None not in seeds and len(set(seeds)) == len(seeds)
    return f"{len(seeds)} {'seeds' if distinct else 'runs'}"


def name_by_directory(groups: list[dict]) -> None:
    """Name each group by its runs' directory name without the trailing -s<seed> ('aux_1e-2' for aux_1e-2-s1,
    aux_1e-2-s2), where all its runs share one and no other group has it; the name by settings stays otherwise."""
    stems = [{re.sub(r'-s\d+$', '', r['name']) for r in g['runs']} for g in groups]
    for g, stem in zip(groups, stems):
        if len(stem) == 1 and stems.count(stem) == 1:
            g['name'] = stem.pop()
            g['label'] = f"{g['name']} ({count_label([r['seed'] for r in g['runs']])})"


def group_runs(runs: list[dict]) -> list[dict]:
    """Runs with equal settings (but for IGNORED_SETTINGS) as groups {'name', 'label', 'settings', 'runs'},
    in the order of each group's first run; a setting a run's config row lacks (it is older than the setting)
    counts as train.py's default, the value it ran with. name is the runs' label; groups that would share one get the
    settings that tell them apart appended ('moe [learning_rate=0.002]'). label adds the count of runs
    ('deepseek_moe (3 seeds)')."""
    # a setting newer than a run took its default there: the run behaved so. train.py is where every default lives
    # (one place, beside the loop that uses it); importing it runs only assignments and definitions (loop: __main__)
    from train import DEFAULTS
    groups = []
    for run in runs:
        # the settings as given, with the dtype the run really used ('auto' differs from machine to machine)
        settings = {**DEFAULTS, **run['config'].get('config', {}), 'dtype': run['config'].get('dtype')}
        group = next((g for g in groups if not differing_settings([g['settings'], settings])), None)
        if group is None:
            groups.append({'name': run['label'], 'settings': settings, 'runs': [run]})
        else:
            group['runs'].append(run)
    names = []
    for g in groups:
        namesakes = [h['settings'] for h in groups if h['name'] == g['name']]
        keys = differing_settings(namesakes) if len(namesakes) > 1 else []
        values = ', '.join(f"{k}={g['settings'].get(k)}" for k in keys)
        names.append(f"{g['name']} [{values}]" if keys else g['name'])
    for g, name in zip(groups, names):
        g['name'] = name
        g['label'] = f"{name} ({count_label([r['seed'] for r in g['runs']])})"
    return groups


# -----------------------------------------------------------------------------
# metric math: small pure functions


def load_shares(counts: list[list[float]]) -> list[list[float]]:
    """Per layer, the share of token-slots each expert received (each layer's shares sum to 1)."""
    return [[c / sum(layer) if sum(layer) else 0.0 for c in layer] for layer in counts]


def share_spread(counts_per_run: list[list[list[float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over runs of each expert's share (load_shares), each (n_layers, n_experts)."""
    shares = np.array([load_shares(c) for c in counts_per_run])      # (n_runs, n_layers, n_experts)
    return shares.mean(0), shares.min(0), shares.max(0)


def layer_mean(values: list[float] | None) -> float | None:
    """A per-MoE-layer metric (maxvio_batch, maxvio_global, dropped_frac) averaged over layers; None if absent."""
    return float(np.mean(values)) if values else None


def present(values: list) -> list:
    """The values that are not None."""
    return [v for v in values if v is not None]


def run_numbers(run: dict) -> dict:
    """The numbers of one run: best and final val loss, the iteration of the final eval, the median
    tokens/s of its train rows (the final eval's if it has none), and the final maxvio_batch, maxvio_global
    and dropped share, each averaged over MoE layers (None for a dense run, or where the final eval lacks
    it: an eval with no training steps before it, as at iteration 0, logs no maxvio_batch). Final = the
    final eval row (load_run has merged the rows of one iteration and left eval_only looks out), for every
    number: no value of an earlier eval stands in for a missing one."""
    evals = run['evals']
    final = evals[-1]
    speeds = present([r.get('tokens_per_s') for r in run['train']])
    return {
        'best_val_loss': min(r['val_loss'] for r in evals), 'final_val_loss': final['val_loss'],
        'final_iter': final['iter'],
        'tokens_per_s': statistics.median(speeds) if speeds else final.get('tokens_per_s'),
        'maxvio_batch': layer_mean(final.get('maxvio_batch')),
        'maxvio_global': layer_mean(final.get('maxvio_global')),
        'dropped_share': layer_mean(final.get('dropped_frac')),
        'final_val_loss_leaky': final.get('val_loss_leaky'),     # expert choice: evaluated as trained (see train.py)
    }


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1) of values; the std is None for a single value."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def mean_or_none(values: list) -> float | None:
    """The mean of the values that are not None; None if there are none."""
    return statistics.mean(present(values)) if present(values) else None


# t_{0.975, df} for df = 1..30: the two-sided 95% quantile of Student's t distribution
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_975(df: int) -> float:
    """Student's t quantile t_{0.975, df}: the table T_975 up to df = 30, beyond it the Cornish-Fisher
    expansion around the normal quantile z = 1.96, z + (z^3 + z)/(4 df) + (5z^5 + 16z^3 + 3z)/(96 df^2),
    within 1e-4 of the exact value for df > 30 (1.96 + 2.4/df is 0.002 off at df = 31)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def leak_row(group: dict) -> dict | None:
    """An expert-choice group's two final validation losses (results/expert_choice/README.md): val_loss routes each token by
    itself (causal), val_loss_leaky by expert choice over each batch as in training, which reads later tokens. The
    leak = leaky - causal, per run, then its mean and 95% interval over the runs. None for other groups."""
    numbers = [run_numbers(r) for r in group['runs']]
    if any(n['final_val_loss_leaky'] is None for n in numbers):
        return None
    causal = [n['final_val_loss'] for n in numbers]
    leaky = [n['final_val_loss_leaky'] for n in numbers]
    (c, c_half), (lk, lk_half) = mean_interval(causal), mean_interval(leaky)
    leak, leak_half = mean_interval([b - a for a, b in zip(causal, leaky)])
    return {'group': group['label'], 'name': group['name'], 'n_runs': len(numbers),
            'expert_choice_group': group['settings'].get('expert_choice_group'),
            'causal_mean': c, 'causal_half_width': c_half, 'leaky_mean': lk, 'leaky_half_width': lk_half,
            'leak_mean': leak, 'leak_half_width': leak_half, 'leak_runs': [b - a for a, b in zip(causal, leaky)]}


def leak_table(rows: list[dict]) -> str:
    """The expert-choice groups' causal and leaky final val losses as a markdown table."""
    def cell(mean, half):
        return f"{mean:.4f}" + ('' if half is None else f" ± {half:.4f}")
    lines = ['| group | tokens chosen among (0 = batch) | val loss, token by token (causal) | val loss, as trained (leaky) | '
             'leaky - causal |', '|---|---:|---:|---:|---:|']
    for r in rows:
        lines.append(f"| {r['group']} | {r['expert_choice_group']} | {cell(r['causal_mean'], r['causal_half_width'])} | "
                     f"{cell(r['leaky_mean'], r['leaky_half_width'])} | {cell(r['leak_mean'], r['leak_half_width'])} |")
    lines += ['', 'Means over runs ± the half-width of their 95% t interval; leaky - causal is taken run by run. The causal '
              'loss is the one compared everywhere else; the leaky one reads later tokens through the choice of experts.']
    return '\n'.join(lines)


def mean_interval(values: list[float]) -> tuple[float, float | None]:
    """Mean of values and the half-width t_{0.975, n-1} * sd / sqrt(n) of its 95% t interval (sd the sample
    standard deviation); the half-width is None for a single value."""
    mean, sd = mean_std(values)
    return mean, (None if sd is None else t_975(len(values) - 1) * sd / math.sqrt(len(values)))


def welch_difference(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """mean(a) - mean(b) of two unpaired samples (>= 2 values each), the half-width of its 95% Welch
    interval and the Welch-Satterthwaite degrees of freedom
        df = (v_a + v_b)^2 / (v_a^2 / (n_a - 1) + v_b^2 / (n_b - 1)),  v = s^2 / n;
    the t quantile is taken at floor(df), which widens the interval a little (conservative)."""
    (mean_a, sd_a), (mean_b, sd_b) = mean_std(a), mean_std(b)
    v_a, v_b = sd_a ** 2 / len(a), sd_b ** 2 / len(b)
    if v_a + v_b == 0:                     # no spread at all: the interval is a point
        return mean_a - mean_b, 0.0, float(len(a) + len(b) - 2)
    df = (v_a + v_b) ** 2 / (v_a ** 2 / (len(a) - 1) + v_b ** 2 / (len(b) - 1))
    return mean_a - mean_b, t_975(math.floor(df)) * math.sqrt(v_a + v_b), df


def seed_means(runs: list[tuple[int | None, float]]) -> dict[int, float]:
    """(seed, value) of each run -> the mean value per seed (runs of unknown seed left out)."""
    by_seed = {}
    for seed, value in runs:
        if seed is not None:
            by_seed.setdefault(seed, []).append(value)
    return {seed: statistics.mean(values) for seed, values in by_seed.items()}


def sign_agreement(diffs: list[float], mean: float) -> int:
    """How many differences have the sign of their mean (are 0 too, if the mean is 0)."""
    return sum(1 for d in diffs if np.sign(d) == np.sign(mean))


def pair_stats(a: list[tuple[int | None, float]], b: list[tuple[int | None, float]]) -> dict:
    """The difference a - b of final val loss between two groups, from each group's (seed, final val loss)
    per run. Paired on the shared seeds where there are >= 2 of them; otherwise a Welch interval when both
    groups have >= 2 runs; otherwise (a group of one) the difference of the means alone. Returns method
    ('paired' | 'welch' | 'means'), mean_diff, half_width and ci95 [low, high] of the 95% interval (None
    without one), df, and for 'paired' n_seeds, seeds_agree (the seeds whose difference has the sign of
    mean_diff), paired_seeds and all_paired (False when a run of either group has no partner: then
    mean_diff is over the shared seeds and differs from the difference of the two groups' means)."""
    seeds_a, seeds_b = seed_means(a), seed_means(b)
    shared = sorted(s for s in seeds_a if s in seeds_b)
    out = {'n_seeds': None, 'seeds_agree': None, 'paired_seeds': None, 'all_paired': None}
    if len(shared) >= 2:
        diffs = [seeds_a[s] - seeds_b[s] for s in shared]
        diff, half = mean_interval(diffs)
        out.update(method='paired', df=len(diffs) - 1, n_seeds=len(diffs), seeds_agree=sign_agreement(diffs, diff),
                   paired_seeds=shared, all_paired=len(a) == len(b) == len(shared))
    elif len(a) >= 2 and len(b) >= 2:
        diff, half, df = welch_difference([v for _, v in a], [v for _, v in b])
        out.update(method='welch', df=df)
    else:
        diff, half = statistics.mean(v for _, v in a) - statistics.mean(v for _, v in b), None
        out.update(method='means', df=None)
    out.update(mean_diff=diff, half_width=half, ci95=None if half is None else [diff - half, diff + half])
    return out


def direction(diff: float) -> str:
    """The word for the sign of a difference a - b."""
    return 'lower' if diff < 0 else 'higher' if diff > 0 else 'equal'


def paired_on(p: dict) -> str:
    """How a paired comparison paired: 'by seed' when every run of both groups has a partner, else on which seeds."""
    return 'by seed' if p['all_paired'] else f"on seeds {', '.join(map(str, p['paired_seeds']))}"


def pair_line(a: str, b: str, p: dict) -> str:
    """One pair_stats as text: 'deepseek_moe - moe: -0.031 +- 0.008 (3/3 seeds lower)'."""
    head = f"{a} - {b}: {p['mean_diff']:.3f}"
    if p['method'] == 'paired':
        how = '' if p['all_paired'] else f"; paired {paired_on(p)}"
        agree = f"{p['seeds_agree']}/{p['n_seeds']} seeds {direction(p['mean_diff'])}"
        return f"{head} +- {p['half_width']:.3f} ({agree}{how})"
    if p['method'] == 'welch':
        return f"{head} +- {p['half_width']:.3f} (unpaired, Welch df {p['df']:.2f})"
    return f"{head} (a group of one run: no interval)"


def uniform_maxvio(n_experts: int, top_k: int, tokens: int, trials: int | None = None, seed: int = 0) -> float:
    """The MaxVio of random routing: each of `tokens` tokens takes top_k distinct experts uniformly at random,
    and the mean over `trials` of max_i load_i / mean load - 1. Sampling alone gives this much imbalance, so
    it is the yardstick for a measured MaxVio (it grows with the number of experts and shrinks with tokens).
    trials=None: 100, fewer (down to 10) where tokens x experts is large, to stay within ~50M draws."""
    if trials is None:
        trials = min(100, max(10, 50_000_000 // (tokens * n_experts)))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(trials):
        keys = rng.random((tokens, n_experts), dtype=np.float32)
        chosen = np.argpartition(keys, top_k - 1, axis=1)[:, :top_k]       # top_k distinct experts per token
        load = np.bincount(chosen.ravel(), minlength=n_experts)
        values.append(load.max() / load.mean() - 1)
    return float(np.mean(values))


def uniform_references(run: dict) -> dict:
    """uniform_maxvio for a run's maxvio_batch (the tokens of one optimizer step) and maxvio_global (the
    validation tokens of its last eval, counted from the logged loads); None for a dense run."""
    args = run['config']['model_args']
    if args['ffn_type'] == 'dense':
        return {'uniform_maxvio_batch': None, 'uniform_maxvio_global': None}
    k, n = args['top_k'], args['n_experts']
    val_counts = run['evals'][-1].get('val_expert_counts')
    val_tokens = round(sum(val_counts[0]) / k) if val_counts else None
    step_tokens = run['config'].get('tokens_per_iter')
    return {'uniform_maxvio_batch': uniform_maxvio(n, k, step_tokens) if step_tokens else None,
            'uniform_maxvio_global': uniform_maxvio(n, k, val_tokens) if val_tokens else None}


def group_summary(group: dict) -> dict:
    """The numbers of one group, as written to summary.json: 'runs' are the run directories as given;
    val losses as mean and sample std over the runs (std None for one run), and per run ('..._runs');
    tokens_per_s the median over runs of each run's median; final maxvio_batch, maxvio_global and dropped
    share the last eval's value averaged over MoE layers, then over runs (the MaxVio also per run, '..._runs',
    None for a dense run); uniform_maxvio_batch and uniform_maxvio_global what random routing would show for
    the same token counts (uniform_references)."""
    runs = group['runs']
    numbers = [run_numbers(r) for r in runs]
    best, final = [n['best_val_loss'] for n in numbers], [n['final_val_loss'] for n in numbers]
    speeds = present([n['tokens_per_s'] for n in numbers])
    cfg = runs[0]['config']
    return {
        'label': group['label'], 'name': group['name'], 'runs': [r['dir'] for r in runs],
        'seeds': [r['seed'] for r in runs], 'n_runs': len(runs), 'ffn_type': runs[0]['ffn_type'],
        'total_params': cfg['total_params'], 'active_params': cfg['active_params'],
        'final_iters': sorted({n['final_iter'] for n in numbers}),
        'best_val_loss_runs': best, 'best_val_loss_mean': mean_std(best)[0], 'best_val_loss_std': mean_std(best)[1],
        'final_val_loss_runs': final, 'final_val_loss_mean': mean_std(final)[0], 'final_val_loss_std': mean_std(final)[1],
        'tokens_per_s': statistics.median(speeds) if speeds else None,
        'final_maxvio_batch': mean_or_none([n['maxvio_batch'] for n in numbers]),
        'final_maxvio_global': mean_or_none([n['maxvio_global'] for n in numbers]),
        'final_maxvio_batch_runs': [n['maxvio_batch'] for n in numbers],
        'final_maxvio_global_runs': [n['maxvio_global'] for n in numbers],
        'dropped_share': mean_or_none([n['dropped_share'] for n in numbers]),
        **uniform_references(runs[0]),
    }


# the balancing losses a MoE can add to its objective (the router z-loss keeps logits small and does not balance)
BALANCE_LOSSES = ('aux_loss_coef', 'balance_loss_coef', 'seq_aux_coef')


def balancing_kind(settings: dict) -> str:
    """How a MoE balances its experts' load: 'loss-free' (bias_update_speed > 0, the auxiliary-loss-free
    biases of Wang et al. 2024, and no balancing loss), 'auxiliary loss' (one of BALANCE_LOSSES > 0 and no
    bias updates), 'both', 'expert choice' (balanced by construction in training), or 'none'. A setting a run
    lacks (older runs) counts as 0."""
    if settings.get('routing') == 'expert_choice':
        return 'expert choice'
    bias = (settings.get('bias_update_speed') or 0) > 0
    loss = any((settings.get(k) or 0) > 0 for k in BALANCE_LOSSES)
    if bias and loss:
        return 'both'
    if bias:
        return 'loss-free'
    return 'auxiliary loss' if loss else 'none'


def tradeoff_row(summary: dict, kind: str) -> dict:
    """One MoE group in the balance trade-off (tradeoff.png, summary.json 'tradeoff'): its balancing_kind, the
    mean final val loss over its runs with the half-width and bounds of its 95% t interval (mean_interval;
    None for one run), and for maxvio_global and maxvio_batch the mean, min and max over its runs of the final
    value (None where no run logged it) beside random routing's (uniform_...)."""
    mean, half = mean_interval(summary['final_val_loss_runs'])
    row = {'group': summary['label'], 'name': summary['name'], 'kind': kind, 'n_runs': summary['n_runs'],
           'final_val_loss_mean': mean, 'final_val_loss_half_width': half,
           'final_val_loss_ci95': None if half is None else [mean - half, mean + half]}
    for key in ('maxvio_global', 'maxvio_batch'):
        values = present(summary[f'final_{key}_runs'])
        row.update({f'final_{key}_mean': statistics.mean(values) if values else None,
                    f'final_{key}_min': min(values, default=None), f'final_{key}_max': max(values, default=None),
                    f'uniform_{key}': summary[f'uniform_{key}']})
    return row


def compare_groups(groups: list[dict], summaries: list[dict]) -> tuple[list[dict], list[dict]]:
    """Every two groups (a, b) in order (a before b), with the groups' labels and names (the labels without the
    count): the comparable pairs with their pair_stats and text line, and the pairs that are not comparable
    (incomparable_settings) with 'differ' {setting: [a's value, b's value]} and the text why, but no numbers."""
    pairs, not_compared = [], []
    for (ga, a), (gb, b) in itertools.combinations(zip(groups, summaries), 2):
        names = {'a': a['label'], 'b': b['label'], 'a_name': a['name'], 'b_name': b['name']}
        keys = incomparable_settings(ga['settings'], gb['settings'])
        if keys:
            not_compared.append({**names, 'differ': {k: [ga['settings'].get(k), gb['settings'].get(k)] for k in keys},
                                 'text': not_compared_text(a['name'], b['name'], ga['settings'], gb['settings'], keys)})
            continue
        p = pair_stats(list(zip(a['seeds'], a['final_val_loss_runs'])), list(zip(b['seeds'], b['final_val_loss_runs'])))
        pairs.append({**names, **p, 'text': pair_line(a['name'], b['name'], p)})
    return pairs, not_compared


def fmt(v: float | None, spec: str) -> str:
    """v formatted with spec, or '-' for None."""
    return '-' if v is None else format(v, spec)


def with_uniform(value: float | None, uniform: float | None) -> str:
    """A MaxVio cell: the measured value, and random routing's in brackets."""
    return fmt(value, '.3f') + ('' if value is None or uniform is None else f" ({uniform:.3f})")


def markdown_table(summaries: list[dict]) -> str:
    """The group table of summary.md, with a legend of its columns."""
    lines = ['| group | runs | FFN | total params | active params | best val loss | final val loss (iter) | '
             'tokens/s | final maxvio_batch | final maxvio_global | dropped |',
             '|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    for s in summaries:
        best = fmt(s['best_val_loss_mean'], '.4f') + ('' if s['best_val_loss_std'] is None else f" ± {s['best_val_loss_std']:.4f}")
        final = fmt(s['final_val_loss_mean'], '.4f') + ('' if s['final_val_loss_std'] is None else f" ± {s['final_val_loss_std']:.4f}")
        first, last = s['final_iters'][0], s['final_iters'][-1]
        iters = str(first) if first == last else f"{first}-{last}"     # runs still in progress end earlier
        dropped = '-' if s['dropped_share'] is None else f"{100 * s['dropped_share']:.2f}%"
        lines.append(f"| {s['label']} | {s['n_runs']} | {s['ffn_type']} | {s['total_params'] / 1e6:.2f}M | "
                     f"{s['active_params'] / 1e6:.2f}M | {best} | {final} ({iters}) | {fmt(s['tokens_per_s'], ',.0f')} | "
                     f"{with_uniform(s['final_maxvio_batch'], s['uniform_maxvio_batch'])} | "
                     f"{with_uniform(s['final_maxvio_global'], s['uniform_maxvio_global'])} | {dropped} |")
    lines += ['', "Val losses: mean ± sample std over a group's runs. tokens/s: median over runs of each run's median. "
              "Final = the last eval, averaged over MoE layers and runs: maxvio_batch = MaxVio (max load / mean load - 1) "
              "of each training step's expert load, mean over the steps since the previous eval; maxvio_global = "
              "MaxVio of the expert load over all validation batches of the eval (Wang et al. 2024, DeepSeek-V3); "
              "in brackets, the MaxVio that random routing of as many tokens shows (uniform_maxvio: below it, "
              "routing is more even than chance). dropped = share of token-slots over capacity."]
    return '\n'.join(lines)


def pairs_table(pairs: list[dict]) -> str:
    """The differences of final val loss between groups, as a markdown table."""
    lines = ['| a - b | final val loss difference | 95% interval | seeds |', '|---|---:|---:|---|']
    for p in pairs:
        interval = '-' if p['ci95'] is None else f"[{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}] (± {p['half_width']:.3f})"
        if p['method'] == 'paired':
            seeds = f"{p['seeds_agree']}/{p['n_seeds']} {direction(p['mean_diff'])} (paired {paired_on(p)})"
        elif p['method'] == 'welch':
            seeds = f"unpaired (Welch, df {p['df']:.2f})"
        else:
            seeds = 'a group of one run'
        lines.append(f"| {p['a_name']} - {p['b_name']} | {p['mean_diff']:.3f} | {interval} | {seeds} |")
    return '\n'.join(lines)


def maxvio_spread(row: dict, key: str) -> str:
    """A MaxVio cell of the trade-off table: the mean over runs, min-max over them (for several runs), and
    random routing's value: '0.367 (0.100-0.500); random 0.030'."""
    if row[f'final_{key}_mean'] is None:
        return '-'
    spread = f" ({row[f'final_{key}_min']:.3f}-{row[f'final_{key}_max']:.3f})" if row['n_runs'] > 1 else ''
    uniform = row[f'uniform_{key}']
    return f"{row[f'final_{key}_mean']:.3f}{spread}" + ('' if uniform is None else f"; random {uniform:.3f}")


def tradeoff_table(rows: list[dict]) -> str:
    """The balance trade-off of summary.md (one row per MoE group, tradeoff_row), with a legend of its columns."""
    lines = ['| group | balancing | runs | final val loss [95% interval] | final maxvio_global (min-max) | '
             'final maxvio_batch (min-max) |', '|---|---|---:|---:|---:|---:|']
    for r in rows:
        loss = f"{r['final_val_loss_mean']:.4f}"
        if r['final_val_loss_ci95'] is not None:
            loss += f" [{r['final_val_loss_ci95'][0]:.4f}, {r['final_val_loss_ci95'][1]:.4f}]"
        lines.append(f"| {r['group']} | {r['kind']} | {r['n_runs']} | {loss} | {maxvio_spread(r, 'maxvio_global')} | "
                     f"{maxvio_spread(r, 'maxvio_batch')} |")
    lines += ['', "balancing: loss-free = bias updates (Wang et al. 2024) and no balancing loss; auxiliary loss = an "
              "aux, balance or sequence-wise loss and no bias updates; both; expert choice = balanced by construction in "
              "training (its MaxVio is that of its token-by-token evaluation); none. Final val loss: mean over the "
              "group's runs, 95% t interval of the mean (mean ± t_{0.975, n-1} sd / sqrt(n); none for one run). "
              "MaxVio: the final eval's, averaged over MoE layers, mean over runs (min-max over runs); random = "
              "the MaxVio random routing of as many tokens shows."]
    return '\n'.join(lines)


# -----------------------------------------------------------------------------
# figures: per group the mean over its runs, a min-max band over them, and the single runs faint


def curve_band(curves: list[list[tuple[float, float]]]) -> tuple[list[float], np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over curves of (x, y) points, at the x that every curve has (sorted)."""
    xs = sorted(set.intersection(*(set(x for x, _ in c) for c in curves)))
    ys = np.array([[dict(c)[x] for x in xs] for c in curves]).reshape(len(curves), len(xs))   # (n_runs, n_x)
    return xs, ys.mean(0), ys.min(0), ys.max(0)


def draw_group(ax, curves: list[list[tuple[float, float]]], color, label: str) -> None:
    """One group's curves on ax: a single run as one line; several as their mean with a min-max band
    and each run drawn faintly."""
    if len(curves) == 1:
        ax.plot([x for x, _ in curves[0]], [y for _, y in curves[0]], marker='.', color=color, label=label)
        return
    for c in curves:
        ax.plot([x for x, _ in c], [y for _, y in c], color=color, alpha=0.3, linewidth=0.8)
    xs, mean, low, high = curve_band(curves)
    ax.fill_between(xs, low, high, color=color, alpha=0.2, linewidth=0)
    ax.plot(xs, mean, marker='.', color=color, label=label)


def plot_val_loss(groups: list[dict], colors: dict, path: str) -> None:
    """val_loss.png: validation loss against iterations (and tokens, where batch sizes differ) per group."""
    runs = [run for g in groups for run in g['runs']]
    per_iter = {r['config']['tokens_per_iter'] for r in runs}
    ncols = 2 if len(per_iter) > 1 else 1            # different batch sizes: also against tokens seen
    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, 4.5), squeeze=False)
    for g in groups:
        draw_group(axes[0, 0], [[(r['iter'], r['val_loss']) for r in run['evals']] for run in g['runs']],
                   colors[g['name']], g['label'])
        if ncols == 2:
            draw_group(axes[0, 1], [[(r['tokens'] / 1e6, r['val_loss']) for r in run['evals']] for run in g['runs']],
                       colors[g['name']], g['label'])
    axes[0, 0].set(xlabel='iteration', ylabel='validation loss (cross-entropy, nats)',
                   title='Validation loss: mean over seeds, min-max band, single runs faint')
    if ncols == 2:
        axes[0, 1].set(xlabel='tokens seen (millions)', ylabel='validation loss', title='Validation loss vs tokens')
    lows = [min(r['val_loss'] for r in run['evals']) for run in runs]
    highs = [run['evals'][min(1, len(run['evals']) - 1)]['val_loss'] for run in runs]
    for ax in axes[0]:
        ax.set_ylim(min(lows) - 0.05 * (max(highs) - min(lows) + 1e-9), max(highs) + 0.05)   # zoom past the first eval
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# MaxVio 0 (perfect balance) is drawn at this value on log axes
MAXVIO_FLOOR = 1e-3

# the two panels of maxvio.png: the key of the eval rows and what it measures
MAXVIO_PANELS = (('maxvio_batch', "maxvio_batch: MaxVio of each training step's expert load,\n"
                                  "mean over the steps since the previous eval"),
                 ('maxvio_global', 'maxvio_global: MaxVio of the expert load over\nall validation batches of an eval'))


def random_routing_lines(floors: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """One dotted reference line per distinct random-routing MaxVio among (value, group name) pairs: (value,
    legend label), the label naming the groups it belongs to, or 'every group' when all share one value."""
    references: dict[float, list[str]] = {}
    for value, name in floors:
        references.setdefault(round(value, 3), []).append(name)
    return [(value, f"random routing ({value:.3f}): {'every group' if len(references) == 1 else ', '.join(names)}")
            for value, names in sorted(references.items())]


def plot_maxvio(groups: list[dict], summaries: list[dict], colors: dict, path: str) -> bool:
    """maxvio.png: maxvio_batch (training) and maxvio_global (validation) of every MoE group, averaged over
    layers, with random routing's value (the group's summary, uniform_<key>) as a dotted line; False (nothing
    written) when no run logged either."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5))
    drawn = False
    for ax, (key, title) in zip(axes, MAXVIO_PANELS):
        floors = []                             # (random routing's MaxVio, group) of every group drawn
        for g, summary in zip(groups, summaries):
            curves = [[(r['iter'], max(layer_mean(r[key]), MAXVIO_FLOOR)) for r in run['evals'] if r.get(key)]
                      for run in g['runs']]
            curves = [c for c in curves if c]
            if curves:
                draw_group(ax, curves, colors[g['name']], g['label'])
                drawn = True
            reference = summary[f'uniform_{key}']
            if curves and reference:
                floors.append((reference, g['name']))
        for value, label in random_routing_lines(floors):
            ax.axhline(value, color='black', ls=':', lw=1, label=label)
        ax.set_yscale('log')
        ax.set(xlabel='iteration', ylabel=f'{key}, mean over layers', title=title)
        ax.grid(alpha=0.3, which='both')
        if ax.get_legend_handles_labels()[0]:           # below the panel, off the curves
            ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.suptitle('Expert load imbalance, MaxVio = max load / mean load - 1 (Wang et al. 2024, DeepSeek-V3; lower is '
                 'more even): mean over seeds, min-max band, single runs faint', fontsize=10)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


# the marker and colour of each balancing_kind in tradeoff.png
KIND_STYLE = {'loss-free': ('o', 'tab:green'), 'auxiliary loss': ('s', 'tab:blue'), 'both': ('D', 'tab:purple'),
              'expert choice': ('P', 'tab:orange'), 'none': ('^', 'tab:gray')}


def tradeoff_point(row: dict, key: str) -> tuple[float, tuple[float, float], float, float | None] | None:
    """Where a tradeoff_row is drawn in the panel of key ('maxvio_global' | 'maxvio_batch'): x = its mean MaxVio
    and the distances from it down to the min and up to the max (each value drawn no lower than MAXVIO_FLOOR,
    0 has no place on a log axis), y = its mean final val loss and the interval's half-width (None for one run).
    None if no run of the group logged that MaxVio."""
    if row[f'final_{key}_mean'] is None:
        return None
    low, x, high = (max(row[f'final_{key}_{s}'], MAXVIO_FLOOR) for s in ('min', 'mean', 'max'))
    return x, (x - low, high - x), row['final_val_loss_mean'], row['final_val_loss_half_width']


def log_tick(value: float, _pos=None) -> str:
    """A tick label of a log axis in plain numbers, at 1, 2 and 5 times a power of ten only (all nine crowd)."""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f'{value:g}' if round(mantissa) in (1, 2, 5) else ''


def spread_labels(anchors: list[tuple[float, float]], widths: list[float], height: float) -> list[float]:
    """The heights at which to write point labels so that none overlaps another: label i starts at anchors[i]
    (x, y), is widths[i] wide and height high (any units, the same for every label). Labels are placed from the
    lowest anchor up; one that would overlap a label already placed is moved up to just above it."""
    placed: list[tuple[float, float, float]] = []          # (x0, x1, y) of the labels placed so far
    ys = [0.0] * len(anchors)
    for i in sorted(range(len(anchors)), key=lambda i: anchors[i][1]):
        x0, y = anchors[i]
        x1 = x0 + widths[i]
        while True:
            below = [py for px0, px1, py in placed if px0 < x1 and x0 < px1 and abs(py - y) < height - 1e-12]
            if not below:
                break
            y = max(below) + height
        placed.append((x0, x1, y))
        ys[i] = y
    return ys


def label_points(ax, points: list[tuple[float, float, str]], fontsize: float = 7) -> None:
    """Writes each (x, y, name) up and to the right of its point, moved up (spread_labels) where labels would
    overlap, with a thin line back to the point when moved. Call it once the axes' limits and size are final."""
    box = ax.get_window_extent()
    char_w = 0.6 * fontsize * ax.figure.dpi / 72 / box.width           # one character, in axes fractions
    line_h = 1.3 * fontsize * ax.figure.dpi / 72 / box.height
    to_axes = ax.transData + ax.transAxes.inverted()
    starts = [tuple(to_axes.transform((x, y)) + 0.008) for x, y, _ in points]
    ys = spread_labels(starts, [char_w * len(name) for _, _, name in points], line_h)
    for (x, y, name), (lx, ly0), ly in zip(points, starts, ys):
        moved = ly > ly0 + 1e-9
        ax.annotate(name, (x, y), xytext=(lx, ly), textcoords='axes fraction', fontsize=fontsize, va='bottom',
                    arrowprops=dict(arrowstyle='-', lw=0.5, color='0.5', shrinkA=0, shrinkB=3) if moved else None)


def plot_tradeoff(rows: list[dict], path: str) -> bool:
    """tradeoff.png: the balance trade-off of Wang et al. 2024 (Fig. 1, Table 2): final val loss against final
    maxvio_global (left) and maxvio_batch (right), one point per MoE group (tradeoff_point), marked by its
    balancing_kind, with random routing's MaxVio as dotted lines; False (nothing written) for fewer than two
    MoE groups with a MaxVio."""
    if sum(1 for r in rows if r['final_maxvio_global_mean'] is not None or r['final_maxvio_batch_mean'] is not None) < 2:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(14, 7.5))
    titles, panels = dict(MAXVIO_PANELS), []
    for ax, key in zip(axes, ('maxvio_global', 'maxvio_batch')):
        kinds, labels = set(), []
        for r in rows:
            point = tradeoff_point(r, key)
            if point is None:
                continue
            x, (left, right), y, half = point
            marker, color = KIND_STYLE[r['kind']]
            ax.errorbar(x, y, xerr=[[left], [right]], yerr=None if half is None else [[half], [half]], fmt=marker,
                        color=color, capsize=3, markersize=7, label=None if r['kind'] in kinds else r['kind'])
            kinds.add(r['kind'])
            labels.append((x, y, r['name']))
        floors = [(r[f'uniform_{key}'], r['name']) for r in rows
                  if r[f'uniform_{key}'] is not None and r[f'final_{key}_mean'] is not None]
        for value, label in random_routing_lines(floors):
            ax.axvline(value, color='black', ls=':', lw=1, label=label)
            ax.text(value, 0.98, f' random {value:.3f}', transform=ax.get_xaxis_transform(), rotation=90, va='top',
                    fontsize=6)
        ax.set_xscale('log')
        for axis_ticks in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            axis_ticks(plt.FuncFormatter(log_tick))
        ax.set(xlabel=f'final {key}, mean over layers (log; bars min-max over runs)',
               ylabel='final validation loss (bars: 95% interval of the mean)', title=titles[key])
        ax.grid(alpha=0.3, which='both')
        if ax.get_legend_handles_labels()[0]:            # below the panel: wide intervals fill the panel itself
            ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.14))
        panels.append((ax, labels))
    fig.suptitle('Load balance against validation loss (Wang et al. 2024): one point per MoE group, mean over its '
                 f'seeds; lower and further left is better; MaxVio 0 drawn at {MAXVIO_FLOOR:g}', fontsize=10)
    fig.tight_layout()
    for ax, labels in panels:                            # once the layout has fixed every panel's size
        label_points(ax, labels)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def selection_counts(run: dict) -> tuple[list[list[float]], list[int], str] | None:
    """The counts (n_moe_layers, E) for expert_selection.png, the block id of each layer and where they come
    from: the final expert_selection row; for a run still in progress the latest eval's validation counts
    (or, in older runs, its training load). An expert-choice run's final selection is its routing token by token
    ('final, token by token'), the routing its val_loss and maxvio_global see; in training each of its experts
    takes exactly 1/E of the slots (the dashed line), which its training load shows. None for a run without
    expert counts (dense)."""
    if run['selection'] and run['config'].get('config', {}).get('routing') == 'expert_choice':
        return run['selection']['counts'], run['selection']['layers'], 'final, token by token'
    if run['selection']:
        return run['selection']['counts'], run['selection']['layers'], 'final'
    for key, what in (('val_expert_counts', 'validation batches'), ('expert_counts', 'training load')):
        rows = [r for r in run['evals'] if r.get(key)]
        if rows:
            counts = rows[-1][key]
            return counts, list(range(len(counts))), f"in progress: {what} at iter {rows[-1]['iter']}"
    return None


def plot_expert_selection(groups: list[dict], colors: dict, path: str) -> bool:
    """expert_selection.png: per MoE group and layer, the mean share of token-slots per expert over the
    group's runs, error bars min-max over them; False (nothing written) without MoE runs."""
    moe = []
    for g in groups:
        selections = [s for s in (selection_counts(r) for r in g['runs']) if s is not None]
        if selections:
            moe.append((g, selections))
    if not moe:
        return False
    n_layers = max(len(sel[0][0]) for _, sel in moe)
    fig, axes = plt.subplots(len(moe), n_layers, figsize=(3.2 * n_layers, 2.6 * len(moe)), squeeze=False)
    for i, (g, selections) in enumerate(moe):
        mean, low, high = share_spread([counts for counts, _, _ in selections])
        layers = next((layers for _, layers, source in selections if source.startswith('final')), selections[0][1])
        in_progress = [source for _, _, source in selections if not source.startswith('final')]
        note = ('' if not in_progress else f'\n({in_progress[0]})' if len(selections) == 1
                else f'\n({len(in_progress)}/{len(selections)} runs in progress)')
        if any(source == 'final, token by token' for _, _, source in selections):
            note += '\n(expert choice: routed token by token;\nin training every expert takes exactly 1/E)'

        for j in range(n_layers):
            ax = axes[i, j]
            if j >= len(mean):
                ax.axis('off')
                continue
            spread = [mean[j] - low[j], high[j] - mean[j]] if len(selections) > 1 else None
            ax.bar(range(len(mean[j])), mean[j], color=colors[g['name']], width=0.85, yerr=spread,
                   error_kw={'elinewidth': 0.8, 'ecolor': 'black'})
            ax.axhline(1 / len(mean[j]), color='black', linestyle='--', linewidth=1, label='uniform')
            ax.set_title(f"{g['label']}, layer {layers[j]}{note}", fontsize=9)
            ax.set_xlabel('expert', fontsize=8)
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_ylabel('share of token-slots', fontsize=8)
                ax.legend(fontsize=7, loc='upper right')
    fig.suptitle('Expert selection on a fixed validation batch\nat the end of training: mean share over seeds,\n'
                 'error bars min-max over seeds', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------
# routing of single tokens


def routing(run_dir: str, text: str, layer: int, out: str, device: str, val_tokens: int) -> None:
    """routing.png: gate value of every expert for each token of text in one MoE layer;
    top_tokens.md: per expert, the tokens it receives most often on validation data."""
    from dataset import Vocab
    from model import load_checkpoint
    from runtime import resolve_runtime
    from dataset import resolve_data_dir, windows
    runtime = resolve_runtime(device, 'float32', compile=False)           # the same decisions as train.py
    device = runtime.device
    model, ckpt = load_checkpoint(os.path.join(run_dir, 'ckpt.pt'), device, moe_dispatch=runtime.moe_dispatch)
    model.eval()
    ids = model.moe_layer_ids()
    if not ids:
        sys.exit(f"error: {run_dir} is a dense run; --routing needs a moe or deepseek_moe run")
    layer = ids[-1] if layer < 0 else layer
    if layer not in ids:
        sys.exit(f"error: block {layer} of {run_dir} is not a MoE layer; choose one of {ids}")
    ffn = model.transformer.h[layer].ffn
    captured = []
    hook = ffn.register_forward_hook(lambda m, inp, out_: captured.append(inp[0].detach()))

    def route(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts and gates of every token of idx (B, T) in the chosen layer."""
        captured.clear()
        with torch.no_grad():
            model(idx.to(device))
            x = captured[0]
            gates, chosen, _, _ = ffn.route(x.reshape(-1, x.shape[-1]))
        return gates.cpu(), chosen.cpu()

    vocab = Vocab(ckpt.get('data', {}).get('gpt2_ids'))       # the vocabulary it was trained on (None: GPT-2's)
    tokens = vocab.encode(text)[:model.config.block_size]
    if not tokens:
        sys.exit("error: --text is empty")
    gates, chosen = route(torch.tensor([tokens]))
    grid = np.zeros((len(tokens), ffn.n_experts))
    for t in range(len(tokens)):
        grid[t, chosen[t].numpy()] = gates[t].numpy()
    os.makedirs(out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * ffn.n_experts + 2), max(3, 0.28 * len(tokens) + 1.5)))
    im = ax.imshow(grid, aspect='auto', cmap='viridis', interpolation='nearest')
    ax.set_yticks(range(len(tokens)), [repr(vocab.decode([t]))[1:-1] for t in tokens], fontsize=8)
    ax.set_xticks(range(ffn.n_experts), range(ffn.n_experts), fontsize=6)
    ax.set(xlabel='routed expert', title=f"{os.path.basename(os.path.normpath(run_dir))}: gate values in layer {layer} "
                                          f"(top-{ffn.top_k} per token)")
    fig.colorbar(im, ax=ax, label='gate value')
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'routing.png'), dpi=120)
    plt.close(fig)
    print(f"wrote {os.path.join(out, 'routing.png')}")

    cfg = ckpt['config']
    val_path = os.path.join(ckpt.get('data', {}).get('data_dir') or resolve_data_dir(cfg['data_dir'], cfg['dataset']), 'val.bin')
    if not os.path.isfile(val_path):
        print(f"warning: {val_path} not found; top_tokens.md skipped")
        hook.remove()
        return
    data = np.memmap(val_path, dtype=np.uint16, mode='r')
    T = model.config.block_size
    n_windows = max(1, min(val_tokens, len(data) - 1) // T)
    per_expert = [Counter() for _ in range(ffn.n_experts)]
    for start in range(0, n_windows, 16):
        offsets = np.arange(start, min(start + 16, n_windows)) * T
        x, _ = windows(data, offsets, T)
        _, chosen = route(x)
        flat = x.reshape(-1).tolist()
        for tok, experts in zip(flat, chosen.tolist()):
            for e in experts:
                per_expert[e][tok] += 1
    hook.remove()
    lines = [f"# Most frequent tokens per expert, layer {layer} of {run_dir}",
             "", f"{n_windows * T:,} validation tokens; share = the expert's token-slots that were this token.", "",
             "| expert | token-slots | top tokens (share) |", "|---:|---:|---|"]
    for e, counter in enumerate(per_expert):
        total = sum(counter.values())
        top = ', '.join(f"`{vocab.decode([t])!r}` {c / total:.0%}" for t, c in counter.most_common(8)) if total else '-'
        lines.append(f"| {e} | {total:,} | {top} |")
    with open(os.path.join(out, 'top_tokens.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


# -----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='*', help="run directories (default: every out*/ here with a metrics.jsonl)")
    parser.add_argument('--out', default='compare_out', help="where the figures, summary.md and summary.json go")
    parser.add_argument('--routing', metavar='RUN_DIR', help="show the routing of --text in one run instead")
    parser.add_argument('--text', default='Once upon a time, there was a little girl named Lily. She loved to play outside.')
    parser.add_argument('--layer', type=int, default=-1, help="block index of the MoE layer (default: the last)")
    parser.add_argument('--val-tokens', type=int, default=20_000, help="validation tokens for top_tokens.md")
    parser.add_argument('--device', default='auto', help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument('--name-by-dir', action='store_true',
                        help="name groups by their run directories without -s<seed> (aux_1e-2-s1 -> aux_1e-2)")
    args = parser.parse_args()
    if args.routing:
        try:
            routing(args.routing, args.text, args.layer, args.out, args.device, args.val_tokens)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
        return
    dirs = args.runs or sorted(d for d in glob.glob('out*/') if os.path.isfile(os.path.join(d, 'metrics.jsonl')))
    runs = [r for r in (load_run(d) for d in dirs) if r is not None]
    if not runs:
        sys.exit("error: no usable runs (looked in: " + (', '.join(dirs) or 'out*/') + "); train first, "
                 "e.g. python train.py config/deepseek_moe.py")
    groups = group_runs(runs)
    if args.name_by_dir:
        name_by_directory(groups)
    os.makedirs(args.out, exist_ok=True)
    # one colour per group, everywhere: tab10 for up to 10 groups, else tab20's 20 (dark and light of each hue)
    palette = plt.get_cmap('tab10' if len(groups) <= 10 else 'tab20').colors
    colors = {g['name']: palette[i % len(palette)] for i, g in enumerate(groups)}
    plot_val_loss(groups, colors, os.path.join(args.out, 'val_loss.png'))
    written = ['val_loss.png']
    summaries = [group_summary(g) for g in groups]
    if plot_maxvio(groups, summaries, colors, os.path.join(args.out, 'maxvio.png')):
        written.append('maxvio.png')
    if plot_expert_selection(groups, colors, os.path.join(args.out, 'expert_selection.png')):
        written.append('expert_selection.png')
    tradeoff = [tradeoff_row(s, balancing_kind(g['settings'])) for g, s in zip(groups, summaries)
                if s['ffn_type'] != 'dense']
    if plot_tradeoff(tradeoff, os.path.join(args.out, 'tradeoff.png')):
        written.append('tradeoff.png')
    leaks = [row for row in (leak_row(g) for g in groups) if row]

    for s in summaries:
        if len(s['final_iters']) > 1:
            print(f"warning: the runs of {s['label']} end at different iterations {s['final_iters']} (some still "
                  f"running?); its final val loss mixes them", file=sys.stderr)
    pairs, not_compared = compare_groups(groups, summaries)
    for q in not_compared:
        print(f"warning: {q['text']}", file=sys.stderr)
    table = markdown_table(summaries)
    with open(os.path.join(args.out, 'summary.md'), 'w') as f:
        f.write(table + '\n')
        if pairs:
            f.write('\nDifferences of final val loss between groups, 95% interval over seeds:\n\n' + pairs_table(pairs) + '\n')
        if not_compared:
            f.write('\nNot compared (groups that differ in more than the FFN and the seed):\n\n'
                    + '\n'.join(f"- {q['text']}" for q in not_compared) + '\n')
        if len(tradeoff) >= 2:
            f.write('\nBalance trade-off:\n\n' + tradeoff_table(tradeoff) + '\n')
        if leaks:
            f.write('\nExpert choice, evaluated two ways:\n\n' + leak_table(leaks) + '\n')
    with open(os.path.join(args.out, 'summary.json'), 'w') as f:
        json.dump({'groups': summaries, 'pairs': pairs, 'not_compared': not_compared, 'tradeoff': tradeoff,
                   'expert_choice': leaks}, f, indent=1)
    print(table)
    if pairs:
        print('\nDifferences of final val loss (a - b), 95% interval over seeds:')
        print('\n'.join(p['text'] for p in pairs))
    if len(tradeoff) >= 2:
        print('\nBalance trade-off:\n' + tradeoff_table(tradeoff))
    if leaks:
        print('\nExpert choice, evaluated two ways:\n' + leak_table(leaks))
    print(f"\nwrote {', '.join(os.path.join(args.out, w) for w in written + ['summary.md', 'summary.json'])}")


if __name__ == '__main__':
    main()
