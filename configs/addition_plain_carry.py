# Depth that grows with difficulty, plain digit order, with long carry chains oversampled: as
# configs/addition_plain_halt.py (LoopLM 2L x 4, operands of 1-4 digits written most significant first,
# coupled positions, aligned layout, five problems per row, every loop's readout supervised, a random
# loop count per batch, entropy halting of the answer at evaluation), but 30% of the training problems
# carry a planted carry chain of 2 to 4 places (`carry_fraction`): drawn at random, chains of 3 or
# more are 0.5% of training, too few for a loop that looks one place further down per pass to pay
# (experiments/addition/results.md, "Long carry chains oversampled").
#   OMP_NUM_THREADS=1 nice -n 10 python -m looplm.train configs/addition_plain_carry.py
#   python -m looplm.eval_addition out/addition_plain_carry/best --digits 1-12 --by-carry
#   python -m looplm.eval_addition out/addition_plain_carry/best --digits 1-12 --by-carry \
#       --halt none --max-loops 1      # the same model at a fixed depth of one loop
base = "addition_plain_halt.py"
out_dir = "out/addition_plain_carry"
carry_fraction = 0.3  # training problems with a planted carry chain of 2+ places
weight_decay = 0.1
