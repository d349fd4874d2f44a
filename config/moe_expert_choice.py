# config/moe_expert_choice.py: config/moe.py's experts (8, each 2 * n_embd wide) routed by expert choice (Zhou et al.
# 2022) instead of token choice: in training every expert takes the C = capacity_factor * top_k * tokens / 8 tokens of
# the batch it scores highest, so every expert gets exactly C and a token gets 2 experts on average (0 to 8), with no
# balancing loss. Total and active parameters are config/moe.py's. Not causal: which tokens an expert takes depends
# on later tokens, so train.py evaluates it token by token (val_loss) and, for the demonstration, as trained
# (val_loss_leaky). results/expert_choice/README.md measures the leak.
out_dir = 'out-moe_expert_choice'
ffn_type = 'moe'
routing = 'expert_choice'
n_experts = 8
top_k = 2                  # the average experts per token: C = capacity_factor * top_k * tokens / n_experts
expert_hidden = 2 * n_embd
capacity_factor = 1.0      # Zhou et al.'s EC-CF2: capacity factor 2 in their units, 1.0 * top_k = 2 here
z_loss_coef = 0.001        # router z-loss (ST-MoE), as config/moe.py
