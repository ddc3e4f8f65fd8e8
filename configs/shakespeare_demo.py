# A one-to-two minute demo: LoopLM 1L x 4 at nanoGPT's CPU size on tiny-shakespeare, with entropy
# halting at evaluation. `python -m looplm.train configs/shakespeare_demo.py`
out_dir = "out/shakespeare_demo"
task = "shakespeare"
max_seconds = 90.0  # stops here, or at max_iters, whichever comes first
max_iters = 2000
eval_interval = 250
eval_iters = 20
log_interval = 10
batch_size = 12
learning_rate = 4e-3  # 4x nanoGPT's: the looped model's best rate in experiments/space_time_study
min_lr = 1e-4
warmup_iters = 50
loss_weights = "ramp"  # supervise every loop, the last most: early loops learn to read out, so halting pays

block_size = 64
n_embd = 128
n_head = 4
n_layer = 1
n_loops = 4
dropout = 0.0
halt = "entropy"
halt_threshold = 1.5  # nats: a token stops looping once its next-character distribution is this sure
