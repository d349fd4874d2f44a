"""
Mixture-of-Experts feed-forward layers, standard and DeepSeekMoE, in one file.

A MoE layer replaces the one big FFN of a transformer block by many small FFNs (the experts) and a
router that sends every token to only `top_k` of them. Read it in this order:

1. pure functions: the balancing losses and the load metrics (tests check them by hand);
2. `MoE.route`: scores, top-k selection, gate values;
3. `MoE.dispatch`: sort the token-slots by expert, run every expert on its contiguous rows with one
   grouped matmul, weight by the gates and add back (in training, optionally dropping slots past the
   capacity);
4. `MoE.forward`: route + dispatch + shared experts + the auxiliary losses and routing statistics;
5. `MoE.update_bias`: DeepSeek-V3's auxiliary-loss-free balancing, called once per optimizer step;
6. `all_to_all_experts`: expert parallelism, the slots sent to experts that live on other ranks and back
   (expert_parallel.py sets it up: which rank holds which experts, gradients, checkpoints).

Standard MoE and DeepSeekMoE share every line of routing and dispatch. They differ only in
(a) how gates are computed from the scores, (b) which balancing is on, (c) shared experts, and
(d) the shape of the config (DeepSeekMoE = m x more experts, each 1/m as wide, top_k also m x):
all of which is set by `GPTConfig` and the config files, not by a second class.

Papers: Shazeer et al. 2017 "Outrageously Large Neural Networks" (importance loss);
Lepikhin et al. 2020 "GShard" (capacity, priority of first choices); Fedus et al. 2021 "Switch
Transformers" (load-balancing loss, capacity factor); Zoph et al. 2022 "ST-MoE" (router z-loss);
Dai et al. 2024 "DeepSeekMoE" (fine-grained + shared experts); DeepSeek-AI 2024 "DeepSeek-V3"
(auxiliary-loss-free balancing, sigmoid affinities, sequence-wise balance loss).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# -----------------------------------------------------------------------------
# Balancing losses and load metrics: small pure functions, tensors in, tensor out.
# Shapes: N tokens, E experts, k experts per token.


def expert_load(idx: Tensor, n_experts: int) -> Tensor:
    """Token-slots routed to each expert: c_i = sum_t sum_j 1[idx_{t,j} = i]. (N, k) -> (E,) float32."""
    flat = idx.reshape(-1)
    # scatter_add rather than bincount: the output shape is static, so torch.compile keeps one graph
    return torch.zeros(n_experts, device=idx.device, dtype=torch.float32).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.float32))


def max_vio(load: Tensor) -> Tensor:
    """MaxVio = max_i load_i / mean_i load_i - 1 (DeepSeek-V3 / Wang et al. 2024). 0 = perfectly even."""
    return load.max(-1).values / load.mean(-1) - 1


def coefficient_of_variation(x: Tensor) -> Tensor:
    """CV = std / mean over experts (population std: the E experts are the whole population)."""
    return x.std(-1, unbiased=False) / x.mean(-1)


def importance(gates_dense: Tensor) -> Tensor:
    """Shazeer et al. 2017, eq. 6: Importance_i = sum_t G_{t,i}, the column sums of the selector-weight
    matrix gates_dense (N, E): gate value where an expert was chosen, else 0. (N, E) -> (E,)."""
    return gates_dense.sum(0)


def importance_loss(gates_dense: Tensor) -> Tensor:
    """Shazeer et al. 2017, eq. 7: L = CV(Importance)^2 = var / mean^2 (population variance, as in
    `coefficient_of_variation`). Multiply by the coefficient lambda outside."""
    imp = importance(gates_dense)
    return imp.var(unbiased=False) / (imp.mean() ** 2 + 1e-10)


def load_balance_loss(probs: Tensor, idx: Tensor, n_experts: int) -> Tensor:
    """Switch Transformer eq. 4-6: L = N_e * sum_i F_i * P_i.

    F_i = fraction of the routed token-slots sent to expert i (no gradient: it comes from argmax);
    P_i = mean router probability of expert i (the gradient flows through it).
    Equals 1 when routing is uniform. Multiply by the coefficient alpha outside.

    Convention: F_i is a share of the N*k token-slots, so it sums to 1 for any top-k (Switch's top-1
    definition, extended). Hugging Face's Mixtral `load_balancing_loss_func` divides by tokens instead
    (its F sums to k), so its value is k times ours: alpha = 0.01 here at top-2 equals 0.005 in its units.
    """
    f = expert_load(idx, n_experts) / idx.numel()     # F_i, sums to 1
    p = probs.mean(0)                                 # (N, E) -> (E,) P_i
    return n_experts * (f * p).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE eq. 5: L_z = mean_t (log sum_i exp(u_{t,i}))^2, keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def sequence_balance_loss(scores: Tensor, idx: Tensor, n_experts: int, batch_size: int) -> Tensor:
    """DeepSeek-V3 eq. 17-20, averaged over the sequences of the batch.

    For each sequence of T tokens: f_i = E / (k T) * sum_t 1[i in TopK_t], TopK_t the experts token t was really
    sent to, chosen by s + b (V3's eq. 18 writes TopK of s alone; with the balancing bias the two differ, and the
    loss should see the load the experts get);
    s'_{t,i} = s_{t,i} / sum_j s_{t,j};  P_i = (1/T) sum_t s'_{t,i};  L = sum_i f_i P_i.
    scores: (B*T, E) affinities, idx: (B*T, k). Equals 1 when every sequence is balanced.
    """
    n, k = idx.shape
    t = n // batch_size
    s = scores.view(batch_size, t, n_experts)
    p = (s / s.sum(-1, keepdim=True)).mean(1)                      # (B, E) P_i per sequence
    counts = torch.zeros(batch_size, n_experts, device=idx.device, dtype=scores.dtype)
    counts.scatter_add_(1, idx.view(batch_size, t * k), torch.ones_like(counts[:, :1]).expand(-1, t * k))
    f = counts * n_experts / (k * t)                               # (B, E) f_i per sequence
    return (f * p).sum(-1).mean()


def grouped_mm_runs(device_type: str, dtype: torch.dtype, compiling: bool, widths: tuple[int, ...] = ()) -> bool:
    """Whether F.grouped_mm takes this device, dtype and these matrix widths (torch 2.10-2.13). CUDA: bfloat16
    only (and compute capability >= 8.0, which runtime.choose_runtime checks before training; torch 2.13's source
    also takes float32 and float16 there in eager mode, earlier releases refused them). CPU: float32,
    bfloat16 and float16 in eager mode, but only bfloat16 when compiled (its meta function demands bf16).
    Never float64, and no other device. Every row stride must be a multiple of 16 bytes: n_embd and
    expert_hidden times the element size (widths). Where it does not run, the MoE layer uses the loop."""
    if any(w * dtype.itemsize % 16 for w in widths):
        return False
    if dtype == torch.bfloat16:
        return device_type in ('cuda', 'cpu')
    return device_type == 'cpu' and not compiling and dtype in (torch.float32, torch.float16)


def expert_capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
    """Expert capacity = capacity_factor * top_k * tokens / experts (Switch Transformer sec. 2.2, times k slots per
    token). Rounded up, so that a factor of 1.0 can hold a perfectly balanced batch. 0 = dropless."""
    if capacity_factor <= 0:
        return 0
    return max(1, math.ceil(capacity_factor * top_k * n_tokens / n_experts))


def all_to_all_experts(xs: Tensor, counts: Tensor, experts, group) -> Tensor:
    """Expert parallelism: every token-slot through its expert on the rank that holds it, and back.

    The ep ranks of `group` hold E_l = E / ep consecutive experts each (rank j: experts j*E_l ... (j+1)*E_l - 1).
    xs (M, C): this rank's slots sorted by expert, counts (E,) of them per expert (after capacity: the dropped slots,
    at the end of xs, stay here and come back as zeros). experts(rows, local_counts): this rank's E_l experts on rows
    grouped by local expert, local_counts (E_l,) of them each. Returns (M, C): each slot's expert output, in xs's order.
    Differentiable: the backward of an all-to-all is the all-to-all of the gradients the other way, so the gradient
    of every rank's loss reaches the experts that served its tokens.
    """
    import torch.distributed as dist        # here: the single-process path never touches torch.distributed
    from torch.distributed._functional_collectives import all_to_all_single_autograd
    ep = dist.get_world_size(group)
    send = counts.view(ep, -1)                  # (E,) -> (ep, E_l): send[j, e] slots for local expert e of rank j
    # 1. the counts: recv[j, e] = the slots rank j sends to my local expert e
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # The host sync: all_to_all_single takes its split sizes as Python ints (each rank must size its receive buffer
    # before the rows arrive), so .tolist() waits here for the device to finish routing. Once per MoE layer and
    # forward; the backward reuses these splits. Megatron-LM and torchtitan sync at the same point.
    send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
    # 2. dispatch: each slot to the rank holding its expert; rows arrive grouped by source rank, then by expert
    rows = all_to_all_single_autograd(xs[:sum(send_splits)], recv_splits, send_splits, group)   # (M_in, C)
    # 3. regroup the arrivals by local expert (stable: by source rank within an expert), run the local experts,
    #    and put the outputs back in arrival order (argsort of a permutation is its inverse)
    local = torch.arange(send.shape[1], device=xs.device).repeat(ep)          # expert of each (source, expert) block
    order = torch.argsort(local.repeat_interleave(recv.flatten(), output_size=rows.shape[0]), stable=True)
    out = experts(rows.index_select(0, order), recv.sum(0)).index_select(0, torch.argsort(order))
    # 4. combine: the outputs back to the slots' own ranks, the same splits the other way
    ys = all_to_all_single_autograd(out, send_splits, recv_splits, group)    # (M_kept, C)
    return torch.cat([ys, ys.new_zeros(xs.shape[0] - ys.shape[0], ys.shape[1])])        # dropped slots: 0


def gated_down(h: Tensor, gate: Tensor, down, out_width: int) -> Tensor:
    """g * W_down(h) for rows h (M, H) with gates g (M,), the gate multiplied where it costs least: g * W_down(h) =
    W_down(g * h), so on the H-wide hidden rows when H < C (DeepSeekMoE's fine-grained experts: 64 columns, not
    128), else on the C-wide output rows (the standard MoE's 2C-wide experts). down: the projection (M, H) -> (M, C),
    out_width: C."""
    if h.shape[1] < out_width:
        return down(h * gate[:, None])
    return down(h) * gate[:, None]


# -----------------------------------------------------------------------------
# The MoE layer


class MoE(nn.Module):
    """Routed SwiGLU experts (+ optional shared experts). forward(x) -> (y, aux).

    Expert weights are stacked, one parameter per projection with a leading expert dimension and
    stored (out, in) like nn.Linear, so a single grouped matmul serves every expert:
        expert_i(x) = (silu(x W_gate_i^T) * (x W_up_i^T)) W_down_i^T
    """

    def __init__(self, config, shared_experts: nn.Module | None = None):
        super().__init__()
        C, H, E = config.n_embd, config.expert_hidden, config.n_experts
        self.n_experts, self.top_k = E, config.top_k
        self.deepseek = config.ffn_type == 'deepseek_moe'
        self.score_func = config.score_func
        self.capacity_factor = config.capacity_factor
        self.aux_loss_coef = config.aux_loss_coef
        self.balance_loss_coef = config.balance_loss_coef
        self.z_loss_coef = config.z_loss_coef
        self.seq_aux_coef = config.seq_aux_coef
        self.bias_update_speed = config.bias_update_speed
        self.bias_update_rule = config.bias_update_rule
        self.bias_recenter = config.bias_recenter
        self.dispatch_impl = config.moe_dispatch
        self.expert_choice = config.routing == 'expert_choice'
        self.expert_choice_group = config.expert_choice_group
        # expert choice is evaluated causally (token by token, see route) unless a demonstration asks for the leak
        # (GPT.leaky_expert_choice); training always routes by expert choice
        self.leaky_eval = False
        self.router = nn.Linear(C, E, bias=False)           # u_t . e_i: one score per expert
        self.w_gate = nn.Parameter(torch.empty(E, H, C))
        self.w_up = nn.Parameter(torch.empty(E, H, C))
        self.w_down = nn.Parameter(torch.empty(E, C, H))
        # DeepSeekMoE: shared experts see every token. They are an ordinary dense SwiGLU of width
        # n_shared * expert_hidden (the sum of n_shared SwiGLU experts is exactly that), built by model.py.
        self.shared_experts = shared_experts
        # expert parallelism: the process group of the ranks that share this layer's routed experts, each holding a
        # slice of w_gate/w_up/w_down (expert_parallel.keep_local_experts sets both); None = every expert is here
        self.ep_group = None
        # Auxiliary-loss-free balancing bias b_i (DeepSeek-V3 eq. 16). A buffer: saved in checkpoints,
        # never touched by the optimizer; changed only by update_bias().
        self.register_buffer('expert_bias', torch.zeros(E))
        # on the layer's whole output (routed + shared), as the dense FFN applies it to its output
        self.dropout = nn.Dropout(config.dropout)

    # -- routing ----------------------------------------------------------------

    def router_scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, C) -> scores (N, E), logits (N, E): the affinity of every token to every routed expert.

        The router runs in float32 even under bf16 autocast (float64 in a float64 model): top-k near-ties
        and a bias step of gamma = 1e-3 are below bf16's resolution (about 4e-3 near 0.5). On CUDA that is full
        float32, not TF32 (whose 10-bit mantissa is nearer bf16's 7 bits than float32's 23): train.py allows TF32
        only in a --dtype=float32 run, where every matmul takes it, this one included (runtime.Runtime.tf32).
        """
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), self.router.weight.to(dtype))  # (N, E) u_t . e_i
        if self.score_func == 'sigmoid':
            return torch.sigmoid(logits), logits              # s_{i,t} = sigmoid(u_t . e_i)  (V3 eq. 15)
        return F.softmax(logits, dim=-1), logits              # s_{i,t} = softmax_i(u_t . e_i)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Token choice: every token picks its top_k experts. x (N, C) -> gates (N, k), idx (N, k), scores (N, E),
        logits (N, E)."""
        scores, logits = self.router_scores(x)
        # top-k of the biased scores: b_i changes WHICH experts are chosen (V3 eq. 16), never the gates
        idx = self.selection_scores(scores).topk(self.top_k, dim=-1).indices     # (N, k)
        return self.gate_values(scores, logits, idx), idx, scores, logits

    def selection_scores(self, scores: Tensor) -> Tensor:
        """What top-k ranks the experts by: s_{i,t} + b_i (V3 eq. 16; b = 0 unless bias balancing is on). (N, E)."""
        return scores + self.expert_bias

    def gate_values(self, scores: Tensor, logits: Tensor, idx: Tensor) -> Tensor:
        """The gates of the chosen experts idx (N, k), by this layer's rule. scores, logits (N, E) -> gates (N, k).
        The rule is the layer's (its training top_k decides it), whatever k idx has: analyze_experts.py evaluates
        trained layers with other experts chosen (some masked, fewer or more of them) under the same rule."""
        if self.expert_choice:
            # an expert-choice layer evaluated causally: each token by itself takes its top-k experts by the same
            # scores, gated by them as in training (g_{i,t} = S_{t,i}, no renormalisation)
            return scores.gather(1, idx)
        if self.deepseek:
            gates = scores.gather(1, idx)                     # g_{i,t} = s_{i,t} for i in TopK
            if self.score_func == 'sigmoid':
                gates = gates / gates.sum(-1, keepdim=True)   # V3 eq. 13: normalise over the chosen
            return gates
        if self.top_k == 1:
            # Switch Transformer (eq. 2): the one expert's gate is its probability under the full softmax, so
            # the language-model loss reaches the router through it (a softmax over one kept logit is always 1)
            return scores.gather(1, idx)                      # g_t = p_{i,t}, i = argmax
        # standard top-k MoE (GShard, Mixtral): softmax over the kept logits, i.e. softmax(u_t masked to -inf
        # off the top-k); the masked entries would contribute exp(-inf) = 0, so softmax of the gathered k is it
        return F.softmax(logits.gather(1, idx), dim=-1)

    def route_expert_choice(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Expert choice (Zhou et al. 2022): every expert takes the C token-slots of highest score in each group of
        expert_choice_group tokens (0: all N tokens of the batch), C = capacity_factor * top_k * group / E, so
        every expert gets exactly C per group and a token gets 0 to E experts. The choice depends on every token
        of the group, later ones included: a decoder trained so can read the future (see forward).

        x (N, C) -> token (M,) and gate (M,) of every slot, grouped by expert (M = E * C * groups), counts (E,)
        slots per expert, scores (N, E), logits (N, E).
        """
        scores, logits = self.router_scores(x)              # S_{t,i} = softmax_i(u_t . e_i), as in the paper
        N, E = scores.shape
        group = self.expert_choice_group or N
        if N % group:
            raise ValueError(f"expert_choice_group={group} must divide the {N} tokens of the batch")
        n_groups = N // group
        capacity = min(group, expert_capacity(group, E, self.top_k, self.capacity_factor))
        per_expert = scores.view(n_groups, group, E).transpose(1, 2)          # (G, E, group) S^T of each group
        gate, local = per_expert.topk(capacity, dim=-1)                       # (G, E, C): I = TopC(S^T), G = S[I]
        token = local + torch.arange(n_groups, device=x.device)[:, None, None] * group   # tokens of the batch
        token = token.transpose(0, 1).reshape(-1)           # (G, E, C) -> (E * G * C,): grouped by expert
        gate = gate.transpose(0, 1).reshape(-1)
        counts = torch.full((E,), n_groups * capacity, device=x.device, dtype=torch.long)
        return token, gate, counts, scores, logits

    # -- dispatch ---------------------------------------------------------------

    def _sort_slots(self, idx: Tensor, load: Tensor, capacity: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Order the N*k token-slots by expert. load: (E,) slots routed to each expert (expert_load).
        Returns (order, counts, keep).

        order: (N*k,) slot ids (choice-major: slot j*N + t is token t's j-th choice) sorted by expert;
               slots dropped by capacity are moved to the very end.
        counts: (E,) int64 slots each expert actually processes (after dropping).
        keep: (N*k,) bool, in sorted order, False for dropped slots; None when dropless.
        Everything stays on the device: no .item()/.tolist(), so no host sync and one compiled graph.
        """
        flat_expert = idx.t().reshape(-1)          # (k, N) -> (k*N,): all first choices, then second...
        # stable sort: within an expert, first choices come before second choices, and earlier tokens
        # before later ones; that is the priority order in which capacity is filled (GShard)
        order = torch.argsort(flat_expert, stable=True)
        counts = load.long()
        if not capacity:
            return order, counts, None
        starts = counts.cumsum(0) - counts                       # first sorted row of each expert
        position = torch.arange(order.numel(), device=idx.device) - starts[flat_expert[order]]
        keep = position < capacity                               # rank within its expert < C
        # move the dropped slots behind all kept ones; the kept ones keep their grouped order
        back = torch.argsort((~keep).to(torch.int8), stable=True)
        return order[back], counts.clamp(max=capacity), keep[back]

    def _experts_grouped(self, xs: Tensor, gate: Tensor, counts: Tensor, keep: Tensor | None) -> Tensor:
        """All experts in three grouped matmuls, each row weighted by its gate: g * expert_e(x) for rows xs (M, C)
        sorted by expert, gate (M,), counts (E,) rows per expert."""
        offs = counts.cumsum(0).to(torch.int32)       # end row of each expert's group
        # An expert that got no rows must get a zero weight gradient. On B200 (sm100) grouped_mm's kernel gave such
        # an empty group a nonzero one (pytorch#172439, open; not checked against torch 2.13 on a B200 here). The
        # where passes every busy expert's weights and gradient through unchanged and zeroes an idle one's
        # gradient whatever the kernel wrote (NaN included); one elementwise pass over the weights, on the device.
        busy = (counts > 0)[:, None, None]

        def gmm(a: Tensor, w: Tensor) -> Tensor:      # rows of group e times w[e]^T
            return F.grouped_mm(a, torch.where(busy, w.to(a.dtype), 0).transpose(-2, -1), offs=offs)

        # With capacity, rows past offs[-1] are the dropped slots, and grouped_mm never writes them: not in
        # its output, not in the gradient of its input. Masking xs (so its gradient is masked) and the final
        # output keeps that garbage out of y and out of x.grad; the rows in between are never read.
        if keep is not None:
            xs = torch.where(keep[:, None], xs, 0)
        h = F.silu(gmm(xs, self.w_gate)) * gmm(xs, self.w_up)       # (M, C) -> (M, H)
        out = gated_down(h, gate, lambda h: gmm(h, self.w_down), xs.shape[1])    # (M, H) -> (M, C), times the gates
        return out if keep is None else torch.where(keep[:, None], out, 0)

    def _experts_loop(self, xs: Tensor, gate: Tensor, counts: Tensor, keep: Tensor | None) -> Tensor:
        """Reference/fallback for _experts_grouped: a loop over experts, each on its contiguous slice of rows.

        unbind() gives per-expert views whose backward stacks the gradients once; indexing w[e] in a
        loop would write a zero gradient the size of the whole stacked weight for every expert, O(E^2) memory
        traffic (one layer's forward + backward on the CPU, torch 2.13, 256 experts: 31x a dense layer of the same
        active width with w[e], 2.8-3.0x with unbind).
        """
        sizes = counts.tolist()                       # host sync: acceptable on the fallback path only
        sizes.append(xs.shape[0] - sum(sizes))        # dropped slots at the end (0 when dropless)
        chunks, gate_chunks = xs.split(sizes), gate.split(sizes)
        outs = [gated_down(F.silu(F.linear(xe, wg)) * F.linear(xe, wu), ge, lambda h, wd=wd: F.linear(h, wd), xs.shape[1])
                for xe, ge, wg, wu, wd in zip(chunks, gate_chunks, self.w_gate.unbind(0), self.w_up.unbind(0),
                                              self.w_down.unbind(0))]
        outs.append(torch.zeros_like(chunks[-1]))     # dropped slots contribute exactly zero
        return torch.cat(outs)

    def run_experts(self, x: Tensor, token: Tensor, gate: Tensor, counts: Tensor, keep: Tensor | None) -> Tensor:
        """The token-slots, grouped by expert, through their experts and back: y_t = sum over t's slots s of
        gate_s * expert_{e(s)}(x_t). token (M,): the token of each slot, slots sorted by expert, counts (E,) of
        them per expert (dropped slots, keep False, at the end); gate (M,). x (N, C) -> y (N, C)."""
        if keep is not None:
            # dropped slots: weight 0; where, not a product, so that garbage in their rows cannot leak into the
            # gates' gradient (NaN * 0 is NaN)
            gate = torch.where(keep, gate, 0)
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):       # cast explicitly: grouped_mm is not autocast
            dtype = torch.get_autocast_dtype(x.device.type)
        # index_select, not x[token]: its backward is an index_add_, much cheaper than advanced indexing's
        xs = x.index_select(0, token).to(dtype)            # (N, C) -> (M, C) gathered, grouped by expert
        gate = gate.to(dtype)
        # 'grouped' or 'auto': one grouped matmul where grouped_mm takes this dtype here, else the loop
        widths = (x.shape[1], self.w_gate.shape[1])         # n_embd, expert_hidden: the matrices' row strides
        if self.dispatch_impl != 'loop' and grouped_mm_runs(x.device.type, dtype, torch.compiler.is_compiling(), widths):
            experts = self._experts_grouped
        else:
            experts = self._experts_loop
        if self.ep_group is None:
            ys = experts(xs, gate, counts, keep)
        else:
            # expert parallelism: the owners run the experts ungated (gate 1); the gates multiply the outputs here,
            # on the token's rank, so the router's gradient never travels
            def local_experts(rows: Tensor, local_counts: Tensor) -> Tensor:
                return experts(rows, torch.ones_like(rows[:, 0]), local_counts, None)
            ys = all_to_all_experts(xs, counts, local_experts, self.ep_group) * gate[:, None]
        # combine: add every slot's weighted output into its token's row (index_add_ measured fastest on the CPU,
        # against gathering back by the inverse permutation and summing over k: bench/RESULTS.md)
        y = torch.zeros(x.shape[0], x.shape[1], device=x.device, dtype=ys.dtype).index_add_(0, token, ys)
        return y.to(x.dtype)

    def dispatch(self, x: Tensor, gates: Tensor, idx: Tensor, load: Tensor) -> tuple[Tensor, Tensor]:
        """Token choice: y_t = sum_{i in TopK_t} g_{i,t} * expert_i(x_t), without a loop over tokens.

        x (N, C), gates/idx (N, k), load (E,) slots routed to each expert -> y (N, C) and the number of dropped
        slots (scalar tensor).
        """
        N, k = idx.shape
        # Dropping happens in training only. Which slots overflow is decided over the whole batch, so with
        # a capacity a token's output would depend on later tokens and on other sequences: not causal, and
        # not the model we mean to evaluate. Evaluation and sampling are dropless (Switch and ST-MoE, too,
        # evaluate at a higher capacity than they train with).
        capacity = expert_capacity(N, self.n_experts, k, self.capacity_factor) if self.training else 0
        order, counts, keep = self._sort_slots(idx, load, capacity)
        token = order % N                                  # slot j*N + t belongs to token t
        gate = gates.t().reshape(-1)[order]                # (N*k,) gate of each sorted slot
        y = self.run_experts(x, token, gate, counts, keep)
        return y, (N * k - counts.sum()).float()

    # -- forward ----------------------------------------------------------------

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        B, T, C = x.shape
        xf = x.reshape(B * T, C)                           # (B, T, C) -> (N, C)
        if self.expert_choice and (self.training or self.leaky_eval):
            # expert choice: perfectly balanced by construction, and not causal (each expert's top-C is taken over
            # its whole group of tokens); no capacity is exceeded, so nothing is dropped
            token, gate, counts, scores, logits = self.route_expert_choice(xf)
            y, dropped, load = self.run_experts(xf, token, gate, counts, None), xf.new_zeros(()), counts.float()
            idx = None
        else:
            gates, idx, scores, logits = self.route(xf)
            load = expert_load(idx, self.n_experts)        # (E,) slots routed to each expert, before any dropping
            y, dropped = self.dispatch(xf, gates, idx, load)
        if self.shared_experts is not None:
            y = y + self.shared_experts(xf)                # shared experts see every token
        y = self.dropout(y)
        # auxiliary losses, each switched on by its coefficient (0 = off, not computed)
        zero = xf.new_zeros((), dtype=torch.float32)
        losses = {}
        if self.aux_loss_coef > 0:
            gates_dense = torch.zeros_like(scores).scatter(1, idx, gates.to(scores.dtype))  # (N, E)
            losses['importance_loss'] = importance_loss(gates_dense)
        if self.balance_loss_coef > 0:
            probs = scores / scores.sum(-1, keepdim=True)  # = scores for softmax; normalised for sigmoid
            losses['balance_loss'] = load_balance_loss(probs, idx, self.n_experts)
        if self.z_loss_coef > 0:
            losses['z_loss'] = router_z_loss(logits)
        if self.seq_aux_coef > 0:
            losses['seq_aux_loss'] = sequence_balance_loss(scores, idx, self.n_experts, B)
        aux_loss = (self.aux_loss_coef * losses.get('importance_loss', zero)
                    + self.balance_loss_coef * losses.get('balance_loss', zero)
                    + self.z_loss_coef * losses.get('z_loss', zero)
                    + self.seq_aux_coef * losses.get('seq_aux_loss', zero))
        aux = {
            'aux_loss': aux_loss,
            'expert_counts': load.detach(),               # routed: the router's demand, before capacity dropping
            'dropped_frac': (dropped / load.sum()).detach(),
            **{name: value.detach() for name, value in losses.items()},
        }
        return y.view(B, T, C), aux

    # -- auxiliary-loss-free balancing -----------------------------------------------

    @torch.no_grad()
    def update_bias(self, counts: Tensor, scale: float = 1.0) -> None:
        """Auxiliary-loss-free balancing, once per optimizer step, with gamma = bias_update_speed * scale:
            'sign' rule:          b_i += gamma * sign(mean_load - load_i)             (DeepSeek-V3 sec. 2.1.2)
            'proportional' rule:  b_i += gamma * (mean_load - load_i) / mean_load     (Wang et al. 2024's variant)
        then, with bias_recenter, b -= mean(b) (as torchtitan and nanochat do). Top-k is unchanged by adding one
        constant to every bias, so re-centring changes no routing decision; it only keeps the biases from drifting
        together (the sign rule's steps need not sum to 0).

        counts: (E,) token-slots per expert over the whole step (all micro-steps, summed over DDP ranks first, so
        that every rank computes the same bias). Overloaded experts get a lower bias and are chosen less,
        underloaded ones a higher bias. scale: train.py's schedule of gamma (bias_update_schedule). No-op at gamma 0.
        """
        gamma = self.bias_update_speed * scale
        if gamma <= 0:
            return
        counts = counts.to(self.expert_bias.device, torch.float32)
        mean = counts.mean()                               # k * tokens / E > 0: every token takes k experts
        if self.bias_update_rule == 'sign':
            self.expert_bias += gamma * torch.sign(mean - counts)
        else:
            self.expert_bias += gamma * (mean - counts) / mean
        if self.bias_recenter:
            self.expert_bias -= self.expert_bias.mean()
