# GPT-12L, nanoGPT's shakespeare_char model at 12 layers.
# nanoGPT's train_shakespeare_char settings (384 wide, 6 heads, context 256, batch 64); a GPU run.
out_dir = "out/shakespeare_gpt12l"
task = "shakespeare"
eval_interval = 250
eval_iters = 200
log_interval = 10
batch_size = 64
max_iters = 5000
lr_decay_iters = 5000
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

block_size = 256
n_embd = 384
n_head = 6
n_layer = 12
n_loops = 1
dropout = 0.2
