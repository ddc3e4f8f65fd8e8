# GPT-1L: the same single layer, applied once; configs/shakespeare_loop1x12.py's settings at
# nanoGPT's learning rate. A GPU run.
base = "shakespeare_loop1x12.py"
out_dir = "out/shakespeare_gpt1l"
learning_rate = 1e-3

n_layer = 1
n_loops = 1
