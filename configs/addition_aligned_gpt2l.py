# Length generalisation with position coupling, aligned layout: GPT-2L (two layers: the looped
# model's depth), with the data and training of configs/addition_aligned_loop.py.
#   OMP_NUM_THREADS=1 python -m looplm.train configs/addition_aligned_gpt2l.py
#   python -m looplm.eval_addition out/addition_aligned_gpt2l/best --digits 1-20,30
base = "addition_aligned_loop.py"
out_dir = "out/addition_aligned_gpt2l"

n_layer = 2
n_loops = 1
step_encoding = "none"
