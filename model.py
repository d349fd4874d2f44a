"""
A small GPT whose feed-forward layers are dense, a standard Mixture-of-Experts, or DeepSeekMoE.

Read top to bottom: GPTConfig -> CausalSelfAttention -> MLP -> Block -> GPT -> checkpoints (save and read).
Where and how it runs (device, dtype, compile, MoE dispatch, GPU peak FLOP/s) is runtime.py's.
The FFN type is chosen in one place, Block.__init__; everything about experts lives in moe.py.
Every FFN has the same contract: forward(x) -> (y, aux), aux a small dict of tensors.
"""

import inspect
import math
from contextlib import contextmanager
import os
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from moe import MoE


@dataclass
class GPTConfig:
    vocab_size: int = 50304        # GPT-2's 50257 padded up to a multiple of 64 for speed
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False             # biases in the Linears and LayerNorms of attention, dense FFN and shared experts
                                   # (False: a bit better and faster); routed experts and the router never have one
    ffn_type: str = 'dense'        # 'dense' | 'moe' | 'deepseek_moe'
    ffn_hidden: int = 1536         # width of the dense SwiGLU FFN
    n_dense_layers: int = 0        # MoE models: the first blocks keep a dense FFN (DeepSeek does)
    n_experts: int = 8             # routed experts per MoE layer (shared experts not counted: n_shared_experts)
    top_k: int = 2                 # routed experts per token
    expert_hidden: int = 768       # width of one routed (and one shared) expert
    n_shared_experts: int = 0      # DeepSeekMoE: experts that see every token
    capacity_factor: float = 0.0   # 0 = dropless; else capacity = factor * top_k * tokens / n_experts
    score_func: str = 'softmax'    # router affinity: 'softmax' | 'sigmoid' (deepseek_moe only)
    aux_loss_coef: float = 0.0     # lambda of the importance loss CV(importance)^2
    balance_loss_coef: float = 0.0  # alpha of the Switch load-balancing loss N * sum_i F_i P_i
    z_loss_coef: float = 0.0       # router z-loss
    seq_aux_coef: float = 0.0      # DeepSeek-V3 sequence-wise balance loss
    bias_update_speed: float = 0.0  # gamma of aux-loss-free balancing; 0 = off
    bias_update_rule: str = 'sign'  # 'sign' (DeepSeek-V3) | 'proportional' (Wang et al. 2024): see MoE.update_bias
    bias_recenter: bool = False    # re-centre the balancing biases to mean 0 after each update (routing unchanged)
    routing: str = 'token_choice'  # 'token_choice' (each token its top_k experts) | 'expert_choice' (each expert its
                                   # top C tokens, Zhou et al. 2022: balanced, not causal; evaluated token by token)
    expert_choice_group: int = 0   # expert choice: the tokens an expert chooses among; 0 = the whole batch, block_size =
                                   # each sequence, 32 = chunks of 32 (must divide the batch's tokens)
    moe_dispatch: str = 'auto'     # 'auto' | 'grouped' | 'loop'; auto = grouped where F.grouped_mm runs (train.py: choose_runtime)

    def __post_init__(self):
        def bad(msg: str):
            raise ValueError(msg)
        if self.ffn_type not in ('dense', 'moe', 'deepseek_moe'):
            bad(f"ffn_type must be dense|moe|deepseek_moe, got {self.ffn_type!r}")
        for name in ('vocab_size', 'block_size', 'n_layer', 'n_head', 'n_embd'):
            if getattr(self, name) < 1:
                bad(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.dropout < 1:
            bad(f"dropout={self.dropout} must be in [0, 1)")
        if self.n_embd % self.n_head:
            bad(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0 <= self.n_dense_layers <= self.n_layer:
            bad(f"n_dense_layers={self.n_dense_layers} must be between 0 and n_layer={self.n_layer}")
        if self.ffn_type == 'dense' or self.n_dense_layers > 0:
            if self.ffn_hidden < 1:
                bad(f"ffn_hidden={self.ffn_hidden} must be >= 1 for dense FFN layers")
        if self.ffn_type == 'dense':
            return
        if self.n_experts < 1 or self.expert_hidden < 1:
            bad(f"n_experts={self.n_experts} and expert_hidden={self.expert_hidden} must be >= 1")
        if not 1 <= self.top_k <= self.n_experts:
            bad(f"top_k={self.top_k} is impossible with n_experts={self.n_experts}: "
                f"choose 1 <= top_k <= n_experts")
        if self.score_func not in ('softmax', 'sigmoid'):
            bad(f"score_func must be softmax|sigmoid, got {self.score_func!r}")
        if self.score_func == 'sigmoid' and self.ffn_type != 'deepseek_moe':
            bad("score_func='sigmoid' is DeepSeek-V3's gating: use it with ffn_type='deepseek_moe'")
        if self.n_shared_experts < 0 or self.capacity_factor < 0:
            bad("n_shared_experts and capacity_factor must be >= 0")
        if self.routing not in ('token_choice', 'expert_choice'):
            bad(f"routing must be token_choice|expert_choice, got {self.routing!r}")
        if self.routing == 'expert_choice':
            if self.capacity_factor <= 0:
                bad("routing='expert_choice' needs capacity_factor > 0: each expert takes C = capacity_factor * top_k * "
                    "tokens / n_experts of them (1.0: top_k experts per token on average)")
            balancing = [n for n in ('aux_loss_coef', 'balance_loss_coef', 'seq_aux_coef', 'bias_update_speed')
                         if getattr(self, n) > 0]
            if balancing or self.score_func != 'softmax':
                bad(f"routing='expert_choice' is balanced by construction and scores by softmax: set "
                    f"{', '.join(balancing) or 'score_func'} to {'0' if balancing else 'softmax'}")
        if self.expert_choice_group < 0:
            bad(f"expert_choice_group={self.expert_choice_group} must be >= 0 (0 = the whole batch)")
        if self.bias_update_rule not in ('sign', 'proportional'):
            bad(f"bias_update_rule must be sign|proportional, got {self.bias_update_rule!r}")
        if self.moe_dispatch not in ('auto', 'grouped', 'loop'):
            bad(f"moe_dispatch must be auto|grouped|loop, got {self.moe_dispatch!r}")
        for name in ('aux_loss_coef', 'balance_loss_coef', 'z_loss_coef', 'seq_aux_coef', 'bias_update_speed'):
            if getattr(self, name) < 0:
                bad(f"{name}={getattr(self, name)} must be >= 0")


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)                         # (B, T, 3C) -> 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                 # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """SwiGLU: (silu(x W_gate) * (x W_up)) W_down, the same function as one expert in moe.py. The dense FFN
    (DenseFFN) and DeepSeekMoE's shared experts (n_shared experts of width h == one of width n_shared*h).
    No dropout here: the FFN layer applies it once to its whole output (DenseFFN, MoE.forward)."""

    def __init__(self, config: GPTConfig, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)   # gate and up, fused
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)          # (..., C) -> 2 x (..., H)
        return self.c_proj(F.silu(gate) * up)


class DenseFFN(MLP):
    """The dense FFN with the common FFN contract forward(x) -> (y, aux), dropout on its output."""

    def __init__(self, config: GPTConfig, hidden: int):
        super().__init__(config, hidden)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.dropout(super().forward(x)), {}


class Block(nn.Module):

    def __init__(self, config: GPTConfig, layer_id: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        if config.ffn_type == 'dense' or layer_id < config.n_dense_layers:
            self.ffn = DenseFFN(config, config.ffn_hidden)
        elif config.ffn_type in ('moe', 'deepseek_moe'):
            shared = MLP(config, config.n_shared_experts * config.expert_hidden) if config.n_shared_experts else None
            self.ffn = MoE(config, shared_experts=shared)
        else:
            raise ValueError(f"ffn_type must be dense|moe|deepseek_moe, got {config.ffn_type!r}")

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        x = x + self.attn(self.ln_1(x))       # pre-norm residual blocks
        y, aux = self.ffn(self.ln_2(x))
        return x + y, aux


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight   # weight tying: input embedding = output projection
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init, every parameter family named. Residual-branch output projections (attention
        c_proj, FFN c_proj, experts' w_down) get std 0.02/sqrt(2*n_layer): each block adds two
        branches to the residual stream, and this keeps its variance from growing with depth."""
        std, resid_std = 0.02, 0.02 / math.sqrt(2 * self.config.n_layer)
        nn.init.normal_(self.transformer.wte.weight, std=std)          # also lm_head (tied)
        nn.init.normal_(self.transformer.wpe.weight, std=std)
        for block in self.transformer.h:
            for ln in (block.ln_1, block.ln_2):
                nn.init.ones_(ln.weight)
            nn.init.normal_(block.attn.c_attn.weight, std=std)
            nn.init.normal_(block.attn.c_proj.weight, std=resid_std)
            ffn = block.ffn
            mlps = [ffn] if isinstance(ffn, MLP) else [m for m in [ffn.shared_experts] if m is not None]
            for mlp in mlps:                                           # dense FFN or shared experts
                nn.init.normal_(mlp.c_fc.weight, std=std)
                nn.init.normal_(mlp.c_proj.weight, std=resid_std)
            if isinstance(ffn, MoE):
                nn.init.normal_(ffn.router.weight, std=std)
                nn.init.normal_(ffn.w_gate, std=std)
                nn.init.normal_(ffn.w_up, std=std)
                nn.init.normal_(ffn.w_down, std=resid_std)
                ffn.expert_bias.zero_()
        nn.init.ones_(self.transformer.ln_f.weight)
        for m in self.modules():                                       # all biases (bias=True) start at 0
            if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def moe_layer_ids(self) -> list[int]:
        """Indices of the blocks whose FFN is a MoE layer (the rows of aux['expert_counts'])."""
        return [i for i, block in enumerate(self.transformer.h) if isinstance(block.ffn, MoE)]

    def moe_layers(self) -> list[MoE]:
        return [self.transformer.h[i].ffn for i in self.moe_layer_ids()]

    def param_counts(self) -> dict[str, int]:
        """Total and active (used per token) parameters of the whole model (under expert parallelism, the experts
        other ranks hold included), without the position embeddings (as nanoGPT).
        Active = total minus the routed experts a token does not visit: (E - k) experts per MoE layer. Under expert
        choice a token visits capacity_factor * k experts on average in training (k when evaluated token by token);
        the training average is counted, so that MFU counts the FLOPs trained."""
        total = sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()
        inactive = 0
        for m in self.moe_layers():
            per_expert = m.w_gate[0].numel() + m.w_up[0].numel() + m.w_down[0].numel()
            total += (m.n_experts - m.w_gate.shape[0]) * per_expert   # expert parallelism: the experts held elsewhere
            visited = min(m.n_experts, m.top_k * m.capacity_factor) if m.expert_choice else m.top_k
            inactive += round((m.n_experts - visited) * per_expert)
        return {'total': total, 'active': total - inactive}

    def forward(self, idx: Tensor, targets: Tensor | None = None, return_aux: bool = False):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))   # (B, T, C)
        layer_aux = []
        for block in self.transformer.h:
            x, aux = block(x)
            layer_aux.append(aux)
        x = self.transformer.ln_f(x)
        moe_aux = [a for a in layer_aux if a]           # dense layers return {}
        # the auxiliary losses are averaged over the MoE layers, so a coefficient means the same at any depth
        aux_loss = (torch.stack([a['aux_loss'] for a in moe_aux]).mean() if moe_aux
                    else x.new_zeros((), dtype=torch.float32))
        if targets is not None:
            logits = self.lm_head(x)                                                      # (B, T, V)
            # cross-entropy in at least float32, whatever the autocast dtype of the logits
            ce_loss = F.cross_entropy(logits.view(-1, logits.size(-1)).to(torch.promote_types(logits.dtype, torch.float32)),
                                      targets.view(-1), ignore_index=-1)
            loss = ce_loss + aux_loss             # the training objective; ce_loss is what we compare
        else:
            logits = self.lm_head(x[:, [-1], :])  # inference: only the last position, (B, 1, V)
            ce_loss = loss = None
        if not return_aux:
            return logits, loss
        E = moe_aux[0]['expert_counts'].numel() if moe_aux else 0
        aux = {
            'ce_loss': ce_loss,
            'aux_loss': aux_loss,
            'expert_counts': torch.stack([a['expert_counts'] for a in moe_aux]) if moe_aux
            else x.new_zeros((0, E), dtype=torch.float32),                               # (n_moe_layers, E)
            'dropped_frac': torch.stack([a['dropped_frac'] for a in moe_aux]) if moe_aux
            else x.new_zeros((0,), dtype=torch.float32),                                 # (n_moe_layers,)
        }
        for name in ('importance_loss', 'balance_loss', 'z_loss', 'seq_aux_loss'):      # unweighted, mean over layers
            values = [a[name] for a in moe_aux if name in a]
            if values:
                aux[name] = torch.stack(values).mean()
        return logits, loss, aux

    @contextmanager
    def leaky_expert_choice(self):
        """Within it, expert-choice layers in eval mode route as in training, by expert choice over the batch: the
        leaky evaluation, for the demonstration only (train.py logs it as val_loss_leaky). Outside, they route each
        token by itself, so evaluation and generation are causal."""
        layers = [m for m in self.moe_layers() if m.expert_choice]
        for m in layers:
            m.leaky_eval = True
        try:
            yield
        finally:
            for m in layers:
                m.leaky_eval = False

    @torch.no_grad()
    def update_moe_biases(self, expert_counts: Tensor, scale: float = 1.0) -> None:
        """Aux-loss-free balancing step for every MoE layer. expert_counts: (n_moe_layers, E), the
        token-slots of a whole optimizer step (summed over micro-steps and DDP ranks); scale: the schedule's
        factor on gamma (train.py, bias_update_scale)."""
        for layer, counts in zip(self.moe_layers(), expert_counts):
            layer.update_bias(counts, scale)

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float],
                              device_type: str) -> torch.optim.AdamW:
        """AdamW; weight decay on matrices (embeddings, linears, stacked experts), none on norms and biases.
        The balancing biases are buffers, so they are never seen by the optimizer."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
            {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0},
        ]
        use_fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({'fused': True} if use_fused else {}))

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward), PaLM appendix B: 6 N_active plus
        the attention score/value matmuls 12 * L * H * Q * T. The router is in N_active."""
        cfg = self.config
        n_active = self.param_counts()['active']
        return 6 * n_active + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * cfg.block_size

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float, peak_flops: float) -> float:
        """Model FLOPs utilisation: achieved FLOP/s (from ACTIVE parameters) over the device's peak."""
        flops_per_iter = self.flops_per_token() * self.config.block_size * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 n_tokens: int | None = None) -> Tensor:
        """Sample max_new_tokens tokens after idx (B, T), feeding predictions back in; n_tokens: sample only ids
        below it (the tokenizer's size, where the model's vocabulary is padded beyond it). Runs in eval mode
        (no dropout, no capacity dropping: a token's experts never depend on other tokens), then restores
        the mode the model was in."""
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :n_tokens] / max(temperature, 1e-8)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('inf')
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        self.train(was_training)
        return idx


def save_checkpoint(checkpoint: dict, path: str) -> None:
    """Write to a temporary file, flush it to disk, then rename over the old checkpoint: a kill at any
    moment leaves either the old or the new checkpoint, never a half-written one."""
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint(path: str, trusted: bool = False) -> dict:
    """A checkpoint written by train.py, read onto the CPU with torch.load(weights_only=True): tensors, numbers,
    strings, lists, tuples and dicts only, so opening a checkpoint, even a crafted one, never runs code. A file
    that needs anything else to load (an unsafe one, or one of an earlier version of this repo, which pickled
    numpy's RNG state) is refused in one line naming what it needs. trusted=True unpickles everything: only
    convert_checkpoint.py sets it, for a file its owner vouches for. Raises FileNotFoundError or ValueError with a
    one-line message naming the file and what to do; never modifies the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found; train first (python train.py config/...) "
                                f"or point out_dir at a run directory that holds ckpt.pt")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=not trusted)
    except Exception as e:
        needs = re.search(r'GLOBAL ([\w.]+)', str(e))
        if needs:
            raise ValueError(f"checkpoint {path} needs {needs.group(1)} to load, which could run code, so it was not "
                             f"opened: it was not written by this repo's train.py, or by an earlier version. If you "
                             f"made it yourself: python convert_checkpoint.py --i-trust-this-file {path}") from None
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}); "
                         f"delete it and retrain, or restore a good copy") from None
    missing = [k for k in ('model', 'model_args') if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}; it was not written by this repo's train.py")
    return ckpt


def model_from_checkpoint(ckpt: dict, path: str, **overrides) -> GPT:
    """The GPT of a checkpoint with its weights (on the CPU). overrides change settings that do not change
    the weights' shapes (moe_dispatch, capacity_factor, ...); unknown keys of older checkpoints are ignored."""
    known = {f.name for f in fields(GPTConfig)}
    model = GPT(GPTConfig(**{k: v for k, v in {**ckpt['model_args'], **overrides}.items() if k in known}))
    state = {k.removeprefix('_orig_mod.').removeprefix('module.'): v for k, v in ckpt['model'].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not match its own model_args: {str(e).splitlines()[0]}") from None
    return model


def load_checkpoint(path: str, device: str | torch.device = 'cpu', **overrides) -> tuple[GPT, dict]:
    """Read a checkpoint and rebuild its model on device: (model, checkpoint dict). See read_checkpoint."""
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt, path, **overrides).to(device), ckpt
