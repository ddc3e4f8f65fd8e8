# Depth that grows with difficulty, plain digit order: LoopLM 2L x 4, trained on operands of 1-4
# digits written most significant first, with coupled positions, the aligned layout and five problems
# per row; every loop's readout supervised and a random loop count per batch (1 up to the
# curriculum's), so that any loop count up to 4 is in distribution; entropy halting of the answer at
# evaluation (experiments/addition/results.md, "Depth that grows with difficulty (plain order)").
#   OMP_NUM_THREADS=1 nice -n 10 python -m looplm.train configs/addition_plain_halt.py
#   python -m looplm.eval_addition out/addition_plain_halt/best --digits 1-12 --limit 100 --by-carry
#   python -m looplm.eval_addition out/addition_plain_halt/best --digits 1-12 --limit 100 --by-carry \
#       --halt none --max-loops 1      # the same model at a fixed depth of one loop
out_dir = "out/addition_plain_halt"
task = "addition"
train_digits = (1, 4)
test_digits = tuple(range(1, 13))
reverse_digits = False
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
max_iters = 10000  # the wall-time budget ends training first
max_seconds = 840.0
learning_rate = 1e-2
min_lr = 1e-3
warmup_iters = 50
weight_decay = 0.0
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
