# LoopLM 1L x 8 on addition: train on 1-4 digit operands (digits reversed), test on up to 12.
# A loop curriculum (2 -> 8 loops), every loop supervised, entropy halting at evaluation with a loop
# budget above the training depth. `python -m looplm.eval_addition out/addition_loop/best --digits 1-20`
out_dir = "out/addition_loop"
task = "addition"
train_digits = (1, 4)
test_digits = tuple(range(1, 13))
reverse_digits = True
swap_augment = True
random_offset = True
n_train = 100_000

eval_interval = 250
eval_iters = 20
batch_size = 64
max_iters = 4000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
weight_decay = 0.1
loss_weights = "ramp"
loop_curriculum = (2, 4, 6, 8)

block_size = 64  # a 20-digit problem is 64 tokens
n_embd = 128
n_head = 4
n_layer = 1
n_loops = 8
step_encoding = "learned"
halt = "entropy"
halt_threshold = 0.05
max_loops = 16
