# Length generalisation with position coupling, aligned layout: GPT-1L (one layer, one pass: the looped model's parameters), trained on operands of
# 1-4 digits (digits reversed), tested on 1-20 and 30. Digits of one place value share a position id;
# every operand has one more leading zero than it needs, so every answer digit, the top carry digit
# too, has operand digits of its place value; five problems per training row with disjoint,
# randomly placed id ranges (looplm/data/addition.py).
#   OMP_NUM_THREADS=1 python -m looplm.train configs/addition_aligned_gpt1l.py
#   python -m looplm.eval_addition out/addition_aligned_gpt1l/best --digits 1-20,30
out_dir = "out/addition_aligned_gpt1l"
task = "addition"
train_digits = (1, 4)
test_digits = tuple(range(1, 21)) + (30,)
reverse_digits = True
positions = "coupled"
aligned = True
pack = 5
random_offset = True
swap_augment = True
n_train = 100_000
seed = 0

eval_interval = 250
eval_iters = 4
batch_size = 32
max_iters = 10000  # as the looped model (configs/addition_aligned_loop.py)
max_seconds = 1200.0
learning_rate = 1e-2
min_lr = 1e-4
warmup_iters = 50
weight_decay = 0.1  # decayed: without it, length generalisation varies wildly by seed (results.md)
threads = 1
progress = False
report = False

block_size = 96  # a 30-digit problem is 96 tokens aligned
n_positions = 48  # a 30-digit problem takes ids up to 33; five 4-digit problems 40
n_embd = 64
n_head = 4
n_layer = 1
n_loops = 1
step_encoding = "none"
