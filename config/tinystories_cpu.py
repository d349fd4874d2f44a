# config/tinystories_cpu.py: a size that trains on a 2-core CPU in about 16 minutes per run, for the CPU
# reproduction in README "Results". Put it BEFORE the FFN config so the FFN widths scale with n_embd:
#   python train.py config/tinystories_cpu.py config/deepseek_moe.py --out_dir=out-cpu-deepseek_moe
device = 'cpu'
compile = False            # eager on the CPU: see README, "torch.compile"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 16            # 2,048 tokens per iteration
max_iters = 700
lr_decay_iters = 700
warmup_iters = 50
learning_rate = 2e-3       # a small model takes a larger step
min_lr = 2e-4
eval_interval = 100
eval_iters = 10
log_interval = 20
