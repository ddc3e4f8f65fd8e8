# LoopLM 1L x 8 on addition: train on 1-4 digit operands (digits reversed, zero-padded to 4), test on
# up to 12. A loop curriculum (2 -> 8 loops), every loop supervised, entropy halting at evaluation
# with a loop budget above the training depth. About 10 minutes on one CPU thread:
#   python -m looplm.train configs/addition_loop.py --threads=1
#   python -m looplm.eval_addition out/addition_loop/best --digits 1-12 --max-loops 16
out_dir = "out/addition_loop"
task = "addition"
train_digits = (1, 4)
test_digits = tuple(range(1, 13))
reverse_digits = True
# Fixed-width operands put each place value at a fixed position; with variable widths the digits to
# add must be found by content, and this model had not begun to after 15 minutes.
zero_pad = True
swap_augment = True
# Problems start at position 0, as at evaluation: with learned absolute positions, random offsets
# turn the task into a translation-invariant one that this model does not learn in minutes.
random_offset = False
n_train = 100_000

eval_interval = 250
eval_iters = 20
batch_size = 64
max_iters = 3000
max_seconds = 600.0
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
