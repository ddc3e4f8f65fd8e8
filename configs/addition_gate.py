# Second stage for addition_loop.py: a learned halting gate, trained alone on the frozen model.
# The gate learns, per token and loop, the exit distribution that trades loss against depth.
out_dir = "out/addition_gate"
init_from = "out/addition_loop/best"
task = "addition"
train_digits = (1, 4)
test_digits = tuple(range(1, 13))
zero_pad = True  # the data of addition_loop.py
random_offset = False
n_train = 100_000

gate_only = True
gate_entropy_weight = 0.05
eval_interval = 250
eval_iters = 20
batch_size = 64
max_iters = 1000
learning_rate = 1e-2
min_lr = 1e-3
warmup_iters = 20

halt = "gate"
halt_threshold = 0.5
max_loops = 16
