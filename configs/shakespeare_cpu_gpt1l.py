# GPT-1L: the same single layer, applied once; configs/shakespeare_cpu_loop1x4.py's settings at
# nanoGPT's learning rate.
base = "shakespeare_cpu_loop1x4.py"
out_dir = "out/shakespeare_cpu_gpt1l"
learning_rate = 1e-3

n_layer = 1
n_loops = 1
