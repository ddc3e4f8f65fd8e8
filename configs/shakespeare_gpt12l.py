# GPT-12L, nanoGPT's shakespeare_char model at 12 layers: configs/shakespeare_loop1x12.py's settings at
# nanoGPT's learning rate. A GPU run.
base = "shakespeare_loop1x12.py"
out_dir = "out/shakespeare_gpt12l"
learning_rate = 1e-3

n_layer = 12
n_loops = 1
