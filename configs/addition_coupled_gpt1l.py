# Length generalisation with position coupling: GPT-1L (no loop, the parameters of LoopLM 1L x 4),
# with the data and training of configs/addition_coupled_loop.py.
#   OMP_NUM_THREADS=1 python -m looplm.train configs/addition_coupled_gpt1l.py
#   python -m looplm.eval_addition out/addition_coupled_gpt1l/best --digits 1-20,30
base = "addition_coupled_loop.py"
out_dir = "out/addition_coupled_gpt1l"

n_layer = 1
n_loops = 1
step_encoding = "none"
