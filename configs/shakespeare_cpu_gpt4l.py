# GPT-4L, nanoGPT's CPU model: configs/shakespeare_cpu_loop1x4.py's settings at nanoGPT's learning rate.
base = "shakespeare_cpu_loop1x4.py"
out_dir = "out/shakespeare_cpu_gpt4l"
learning_rate = 1e-3

n_layer = 4
n_loops = 1
