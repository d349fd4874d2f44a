# config/moe.py: a standard (GShard/Switch-style) MoE: 8 experts, top-2, each expert as wide as a
# 2x dense FFN, so a token visits 2 * 2 * n_embd = 4 * n_embd hidden units, as in config/dense.py.
# Balanced by the Switch load-balancing loss; capacity factor 1.25 drops the token-slots that overflow.
out_dir = 'out-moe'
ffn_type = 'moe'
n_experts = 8
top_k = 2
expert_hidden = 2 * n_embd
capacity_factor = 1.25     # capacity = 1.25 * top_k * tokens / n_experts; 0 would be dropless
balance_loss_coef = 0.01   # alpha of N * sum_i F_i * P_i (Switch Transformer)
z_loss_coef = 0.001        # router z-loss (ST-MoE)
