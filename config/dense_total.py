# config/dense_total.py: a dense SwiGLU with the same TOTAL parameters as the MoE configs, the upper bound
# the DeepSeekMoE paper measures against: ffn_hidden = 8 experts * 2 * n_embd = 16 * n_embd hidden units,
# all of them active, so about 4x the FFN compute per token of config/dense.py and the MoE models.
out_dir = 'out-dense_total'
ffn_type = 'dense'
ffn_hidden = 16 * n_embd
