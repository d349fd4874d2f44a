# config/deepseek_moe.py: DeepSeekMoE with the same total and active parameters as config/moe.py.
# Fine-grained segmentation m = 4: the 8 experts of width 2*n_embd become 32 of width n_embd/2;
# 2 of them are shared (see every token), 30 are routed, and top_k = 2 * 4 - 2 shared = 6.
# Active width: (2 + 6) * n_embd/2 = 4 * n_embd; total: 32 * n_embd/2 = 8 * 2 * n_embd.
out_dir = 'out-deepseek_moe'
ffn_type = 'deepseek_moe'
n_experts = 30
n_shared_experts = 2
top_k = 6
expert_hidden = n_embd // 2
score_func = 'sigmoid'     # DeepSeek-V3 affinities; gates renormalised over the chosen experts
bias_update_speed = 0.01   # gamma of auxiliary-loss-free balancing, the largest step, taken early on
bias_update_schedule = 'lr'  # ... then decayed as the LR is, to 1e-3 (DeepSeek-V3's constant gamma) at the end
seq_aux_coef = 0.0001      # alpha of V3's sequence-wise balance loss, kept tiny as in the paper
capacity_factor = 0.0      # dropless
