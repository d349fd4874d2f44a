# config/tinystories_cpu_gpt2.py: the first CPU study's size (results/cpu_gpt2/README.md, the GPT-2-vocabulary study;
# results/cpu_gpt2/), kept so that study reruns: 4 layers, 128 wide, 700 iterations, on GPT-2 tokens
# (data/tinystories/). Its 50,304-way output layer is ~85% of a step; config/tinystories_cpu.py replaced it.
# Put it BEFORE the FFN config so the FFN widths scale with n_embd:
#   python train.py config/tinystories_cpu_gpt2.py config/deepseek_moe.py --out_dir=out-cpu-deepseek_moe
dataset = 'tinystories'
vocab_size = 50304
device = 'cpu'
compile = False            # eager on the CPU: see docs/hardware.md
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
