# config/tinystories_cpu.py: the CPU size of the studies in results/: a 4-layer, 128-wide model on the compact
# 4,096-token vocabulary of the TinyStories sample (python data/tinystories/prepare.py --vocab 4096), so that the
# FFNs, not the output layer, take most of a step. Put it BEFORE the FFN config so the FFN widths scale with n_embd:
#   python train.py config/tinystories_cpu.py config/deepseek_moe.py --out_dir=out-cpu-deepseek_moe
dataset = 'tinystories_v4096'   # vocab_size comes from its meta.pkl (4,096)
device = 'cpu'
compile = False            # eager on the CPU: see docs/hardware.md
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 16            # 2,048 tokens per iteration
max_iters = 1000           # 2.05M tokens: 0.59 passes over the sample's 3.48M training tokens
lr_decay_iters = 1000
warmup_iters = 50
learning_rate = 2e-3       # a small model takes a larger step
min_lr = 2e-4
eval_interval = 100
eval_iters = 10
log_interval = 20
