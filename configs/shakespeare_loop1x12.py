# LoopLM 1L x 12: one tied layer applied 12 times, as deep as GPT-12L with a twelfth of its layers.
# nanoGPT's train_shakespeare_char settings (384 wide, 6 heads, context 256, batch 64); a GPU run.
out_dir = "out/shakespeare_loop1x12"
task = "shakespeare"
eval_interval = 250
eval_iters = 200
log_interval = 10
batch_size = 64
max_iters = 5000
lr_decay_iters = 5000
# 4x nanoGPT's rate, as configs/shakespeare_cpu_loop1x4.py: carried over from the CPU-sized space-time
# study (experiments/space_time_study); not yet measured at this size.
learning_rate = 4e-3
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

block_size = 256
n_embd = 384
n_head = 6
n_layer = 1
n_loops = 12
dropout = 0.2
