# GPT-4L, nanoGPT's CPU model.
# nanoGPT's CPU settings for shakespeare_char (128 wide, 4 heads, context 64, batch 12, 2000 iterations).
out_dir = "out/shakespeare_cpu_gpt4l"
task = "shakespeare"
device = "cpu"
eval_interval = 250
eval_iters = 20
log_interval = 10
batch_size = 12
max_iters = 2000
lr_decay_iters = 2000
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

block_size = 64
n_embd = 128
n_head = 4
n_layer = 4
n_loops = 1
dropout = 0.0
