# config/moe_finegrained.py: the standard MoE of config/moe.py with DeepSeekMoE's first idea alone,
# fine-grained expert segmentation (m = 4): its 8 experts of width 2*n_embd become 32 of width n_embd/2,
# and top_k = 2 * 4 = 8, so total (32 * n_embd/2 = 16 n_embd) and active (8 * n_embd/2 = 4 n_embd) hidden
# units stay those of config/moe.py. Everything else as config/moe.py: softmax gates over the kept,
# Switch load-balancing loss, router z-loss, capacity factor 1.25. Rung 1 of the ladder in results/cpu/README.md.
out_dir = 'out-moe_finegrained'
ffn_type = 'moe'
n_experts = 32
top_k = 8
expert_hidden = n_embd // 2
capacity_factor = 1.25     # capacity = 1.25 * top_k * tokens / n_experts, the same factor as config/moe.py
balance_loss_coef = 0.01   # alpha of N * sum_i F_i * P_i (Switch Transformer)
z_loss_coef = 0.001        # router z-loss (ST-MoE)
