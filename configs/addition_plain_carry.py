# Depth that grows with difficulty, plain digit order, with long carry chains oversampled: as
# configs/addition_plain_halt.py (LoopLM 2L x 4, operands of 1-4 digits written most significant first,
# coupled positions, aligned layout, five problems per row, every loop's readout supervised, a random
# loop count per batch, entropy halting of the answer at evaluation), but 30% of the training problems
# carry a planted carry chain of 2 to 4 places (`carry_fraction`): drawn at random, chains of 3 or
# more are 0.5% of training, too few for a loop that looks one place further down per pass to pay
# (experiments/addition/results.md, "Long carry chains oversampled").
#   OMP_NUM_THREADS=1 nice -n 10 python -m looplm.train configs/addition_plain_carry.py
#   python -m looplm.eval_addition out/addition_plain_carry/best --digits 1-12 --by-carry
#   python -m looplm.eval_addition out/addition_plain_carry/best --digits 1-12 --by-carry \
#       --halt none --max-loops 1      # the same model at a fixed depth of one loop
out_dir = "out/addition_plain_carry"
task = "addition"
train_digits = (1, 4)
test_digits = tuple(range(1, 13))
reverse_digits = False
positions = "coupled"
aligned = True
carry_fraction = 0.3  # training problems with a planted carry chain of 2+ places
pack = 5
random_offset = True
swap_augment = True
n_train = 100_000
seed = 0

eval_interval = 250
eval_iters = 4
batch_size = 32
max_iters = 10000  # the wall-time budget ends training first
max_seconds = 840.0
learning_rate = 1e-2
min_lr = 1e-3
warmup_iters = 50
weight_decay = 0.1
threads = 1
progress = False
report = False

loss_weights = "all"  # every loop's readout is trained: halting may stop at any loop
random_depth = True  # a loop count from 1 to the curriculum's, one per batch
loop_curriculum = (2, 3, 4, 4)  # quarters of training: cheaper steps first, while the digits are learned

block_size = 96  # five packed 4-digit problems take 90 tokens
n_positions = 40
n_embd = 64
n_head = 4
n_layer = 2
n_loops = 4
step_encoding = "none"  # the same map every loop: loops past training depth repeat it
# Only the answer halts: the prompt's tokens run the whole budget (an entropy below 0 never comes),
# the answer's, from '=' on, stop when their readout's entropy falls below 0.1 nats. Trained without
# halting, every token saw the others' keys and values of its own loop; a prompt token halted
# after loop 1 would show the answer tokens of later loops keys they never met (in one run this
# cut exact match at 2 digits from 87% to 20%).
halt = "entropy"
halt_threshold = 0.0
halt_thresholds_after = {11: 0.1}  # 11: '='
max_loops = 8
