# LoopLM 1L x 4: one tied layer applied 4 times, as deep as GPT-4L.
# nanoGPT's CPU settings for shakespeare_char (128 wide, 4 heads, context 64, batch 12, 2000 iterations).
out_dir = "out/shakespeare_cpu_loop1x4"
task = "shakespeare"
device = "cpu"
eval_interval = 250
eval_iters = 20
log_interval = 10
batch_size = 12
max_iters = 2000
lr_decay_iters = 2000
# 4x nanoGPT's rate: the best of 1e-3, 2e-3, 4e-3 for this model in experiments/space_time_study
# (best val loss 1.9135 -> 1.7756 at seed 1337); GPT-1L gains from it too, see the study.
learning_rate = 4e-3
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

block_size = 64
n_embd = 128
n_head = 4
n_layer = 1
n_loops = 4
dropout = 0.0
