# The baseline for addition_loop.py: GPT-4L (four untied layers, no loop), the same data and schedule.
out_dir = "out/addition_gpt4l"
task = "addition"
train_digits = (1, 4)
test_digits = tuple(range(1, 13))
zero_pad = True  # the data of addition_loop.py
random_offset = False
n_train = 100_000

eval_interval = 250
eval_iters = 20
batch_size = 64
max_iters = 4000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100

block_size = 64
n_embd = 128
n_head = 4
n_layer = 4
n_loops = 1
