# config/dense.py: the dense baseline. Its SwiGLU FFN is as wide as the experts a token visits in the
# MoE configs: ffn_hidden = 4 * n_embd = top_k * expert_hidden (moe: 2 * 768) = (2 + 6) * 192 (deepseek_moe).
# Widths are written in terms of n_embd, so a size overlay placed before this file scales them:
#   python train.py config/tinystories_cpu.py config/dense.py
out_dir = 'out-dense'
ffn_type = 'dense'
ffn_hidden = 4 * n_embd
