# Length generalisation with position coupling, aligned layout: GPT-1L (one layer, one pass: the
# looped model's parameters), with the data and training of configs/addition_aligned_loop.py.
#   OMP_NUM_THREADS=1 python -m looplm.train configs/addition_aligned_gpt1l.py
#   python -m looplm.eval_addition out/addition_aligned_gpt1l/best --digits 1-20,30
base = "addition_aligned_loop.py"
out_dir = "out/addition_aligned_gpt1l"

n_layer = 1
n_loops = 1
step_encoding = "none"
