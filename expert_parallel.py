"""
Expert parallelism (EP) on torch.distributed: every MoE layer's routed experts split across ranks.

Under DDP every rank holds every expert. Under EP (train.py --expert_parallel=ep, under torchrun) the W ranks form
W / ep groups of ep consecutive ranks; within a group, rank j holds experts j*E/ep ... (j+1)*E/ep - 1 of every MoE
layer, and the group holds every expert once. Attention, embeddings, routers, shared experts and dense FFNs stay
replicated, as under DDP. 8 ranks with ep = 4:

    EP group 0 = ranks 0 1 2 3   EP group 1 = ranks 4 5 6 7   (the slots travel between the ranks of one group)
    replica groups: {0, 4} {1, 5} {2, 6} {3, 7}                (the ranks holding the same slice of the experts)

The exchange itself (tokens to their experts and back, all-to-all) is moe.all_to_all_experts, called by the MoE layer.
Here is the rest: the groups, each rank's slice, the gradients (equal to DDP's), and checkpoints that hold the full
expert tensors, so that every script, and a run of any number of processes, opens them.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

EXPERT_WEIGHTS = ('w_gate', 'w_up', 'w_down')    # the stacked routed-expert weights of moe.MoE, (E, ., .) each


def expert_groups(ep: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """This rank's EP group (ep consecutive ranks: one node's GPUs for ep <= 8, where all-to-all is fastest) and its
    replica group (the world_size / ep ranks holding the same slice of the experts)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    ep_group = replica_group = None
    # new_group is collective: every rank creates every group, in the same order, and keeps its own
    for g in range(world // ep):
        ranks = list(range(g * ep, (g + 1) * ep))
        group = dist.new_group(ranks)
        if rank in ranks:
            ep_group = group
    for s in range(ep):
        ranks = list(range(s, world, ep))
        group = dist.new_group(ranks)
        if rank in ranks:
            replica_group = group
    return ep_group, replica_group


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    """The routed experts' stacked weights of every MoE layer: the parameters EP splits."""
    return [getattr(layer, name) for layer in model.moe_layers() for name in EXPERT_WEIGHTS]


def keep_local_experts(model: nn.Module, ep_group: dist.ProcessGroup) -> None:
    """Cut the full model (built from the seed or a checkpoint, the same on every rank) to this rank's slice of the
    experts, (E, ., .) -> (E/ep, ., .), before the optimizer is built, and hand every MoE layer its EP group."""
    ep, r = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    for layer in model.moe_layers():
        for name in EXPERT_WEIGHTS:
            # clone: a view would keep the full tensor's memory alive
            setattr(layer, name, nn.Parameter(getattr(layer, name).detach().chunk(ep)[r].clone()))
        layer.ep_group = ep_group


def sync_gradients(model: nn.Module, replica_group: dist.ProcessGroup, world_size: int) -> None:
    """After the backward of a step's last micro-step: every gradient made equal to DDP's on the same data.

    DDP's gradient is the mean over ranks, g = (1/W) sum_r g_r, g_r the gradient of rank r's own loss.
    Replicated parameters: g_r is rank r's, so all-reduce over all W ranks and divide by W, as DDP does.
    Expert parameters: the all-to-all's backward has already summed, into the one rank holding an expert, the
    gradients of the losses of every rank of its EP group. Summed over the W / ep replicas of that slice, it holds
    all W ranks' losses, so it too is divided by W. (Dividing by the replica group's size, W / ep, is the classic
    bug: the experts would take ep times DDP's step.)
    Not overlapped with the backward as DDP's bucketed all-reduce is: simpler, and slower at scale.
    """
    experts = expert_params(model)
    expert_ids = {id(p) for p in experts}
    replicated = [p.grad for p in model.parameters() if id(p) not in expert_ids]
    flat = torch.cat([g.reshape(-1) for g in replicated])         # one all-reduce for all of them
    dist.all_reduce(flat)
    flat /= world_size
    for g, f in zip(replicated, flat.split([g.numel() for g in replicated])):
        g.copy_(f.view_as(g))
    for p in experts:
        dist.all_reduce(p.grad, group=replica_group)
        p.grad /= world_size


def clip_gradients(model: nn.Module, max_norm: float, ep_group: dist.ProcessGroup) -> Tensor:
    """clip_grad_norm_ by the norm of the whole model's gradient, DDP's: ||g||^2 = ||replicated||^2 (the same on
    every rank after sync_gradients: counted once) + the expert slices' squared norms summed over the EP group (which
    holds each expert once). Returns that norm."""
    expert_ids = {id(p) for p in expert_params(model)}
    params = list(model.parameters())
    replicated = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) not in expert_ids])
    experts_sq = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) in expert_ids]) ** 2
    dist.all_reduce(experts_sq, group=ep_group)
    total = (replicated ** 2 + experts_sq).sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _expert_positions(optimizer: torch.optim.Optimizer, model: nn.Module) -> set[int]:
    """The keys of the expert parameters in optimizer.state_dict()['state'] (parameters numbered in group order)."""
    expert_ids = {id(p) for p in expert_params(model)}
    ordered = [p for group in optimizer.param_groups for p in group['params']]
    return {i for i, p in enumerate(ordered) if id(p) in expert_ids}


def _gather(t: Tensor, ep_group: dist.ProcessGroup) -> Tensor | None:
    """The slices (E/ep, ...) of the ranks of ep_group, whole (E, ...), on its first rank (None on the others)."""
    first = dist.get_rank(ep_group) == 0
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(ep_group))] if first else None
    dist.gather(t.contiguous(), parts, group=ep_group, group_dst=0)
    return torch.cat(parts) if parts else None


def full_checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                          ep_group: dist.ProcessGroup) -> tuple[dict, dict] | None:
    """The model's and the optimizer's state dicts with every expert tensor whole, (E, ...), as a one-process run
    writes them, on rank 0; None on every other rank. Call it on every rank: EP group 0 (ranks 0 ... ep-1) holds each
    expert once, so its ranks send their slices to rank 0; the other groups hold copies and send nothing.
    The full model passes through rank 0: fine at this repo's sizes; at DeepSeek-V3's, runs save sharded
    (torch.distributed.checkpoint) instead."""
    if dist.get_rank() >= dist.get_world_size(ep_group):
        return None
    expert_ids = {id(p) for p in expert_params(model)}
    names = {name for name, p in model.named_parameters() if id(p) in expert_ids}
    model_state = {k: _gather(v, ep_group) if k in names else v for k, v in model.state_dict().items()}
    state, positions = optimizer.state_dict(), _expert_positions(optimizer, model)
    # the moments (exp_avg, exp_avg_sq) are stacked like their experts; the step count is a scalar
    moments = {i: {k: _gather(v, ep_group) if i in positions and v.dim() > 0 else v for k, v in s.items()}
               for i, s in state['state'].items()}
    return (model_state, {**state, 'state': moments}) if dist.get_rank() == 0 else None


def local_optimizer_state(state: dict, optimizer: torch.optim.Optimizer, model: nn.Module,
                          ep_group: dist.ProcessGroup) -> dict:
    """A checkpoint's optimizer state (whole expert tensors, from a run of any kind) cut to this rank's experts, for
    the optimizer of a model that keep_local_experts has cut."""
    ep, r, positions = dist.get_world_size(ep_group), dist.get_rank(ep_group), _expert_positions(optimizer, model)
    moments = {i: {k: v.chunk(ep)[r].clone() if i in positions and v.dim() > 0 else v for k, v in s.items()}
               for i, s in state['state'].items()}
    return {**state, 'state': moments}
