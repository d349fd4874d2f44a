# config/moe_shared.py: config/moe_finegrained.py plus DeepSeekMoE's second idea, shared-expert isolation:
# 2 of the 32 quarter-width experts see every token, the other 30 are routed with top_k = 8 - 2 = 6.
# Total (32 * n_embd/2) and active ((2 + 6) * n_embd/2 = 4 n_embd) hidden units as config/moe.py.
# Still the standard MoE's gating (softmax over the kept), Switch loss, z-loss and capacity factor 1.25.
# Rung 2 of the ladder; config/deepseek_moe.py is rung 3 (auxiliary-loss-free balancing instead of the
# Switch loss, with DeepSeek-V3's sigmoid gates and no capacity).
out_dir = 'out-moe_shared'
ffn_type = 'moe'
n_experts = 30
n_shared_experts = 2
top_k = 6
expert_hidden = n_embd // 2
capacity_factor = 1.25     # capacity = 1.25 * top_k * tokens / n_experts (routed slots only)
balance_loss_coef = 0.01   # alpha of N * sum_i F_i * P_i (Switch Transformer), over the routed experts
z_loss_coef = 0.001        # router z-loss (ST-MoE)
