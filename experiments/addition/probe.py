"""Exploratory probe behind the packing notes of results.md (1-layer GPT, trained on 1-3 digits).

    python experiments/addition/probe.py coupled 1 1 64 1500 rev 100000 4   # 4 problems per row
    python experiments/addition/probe.py coupled 1 1 64 3000 rev 100000 1   # one per row (those notes:
                                                   # n_positions 16 and block_size 32 then, 32 and 64 now)
Arguments: positions, n_layer, n_loops, n_embd, iterations, rev|plain, n_train, pack. The "shift"
rows move the evaluation ids up by 0, 2 and 4 (the evaluation offset of the task was 0 then; it now
centres each problem in the table).
"""
import sys, time, torch
from looplm import LoopConfig, LoopGPT
from looplm.data.addition import AdditionTask
from looplm.eval_addition import evaluate
torch.set_num_threads(1)
positions, n_layer, n_loops, C, steps, reverse = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "rev"
torch.manual_seed(0)
task = AdditionTask(train_digits=(1, 3), test_digits=(3, 4, 5, 6, 8), n_train=int(sys.argv[7]) if len(sys.argv) > 7 else 5000, n_test=50, block_size=64, pack=int(sys.argv[8]) if len(sys.argv) > 8 else 1,
                    positions=positions, n_positions=32, reverse=reverse)
model = LoopGPT(LoopConfig(vocab_size=task.vocab_size, block_size=64, n_positions=32, n_embd=C, n_head=4, n_layer=n_layer, n_loops=n_loops))
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
g = torch.Generator().manual_seed(0)
t0 = time.time()
for it in range(steps):
    x, y = task.get_batch("train", 64, g)
    pos = task.get_positions(x, "train", g)
    _, loss = model(x, y, pos=pos)
    opt.zero_grad(); loss.backward(); opt.step()
    for gr in opt.param_groups: gr["lr"] = 3e-3 * (0.1 + 0.9 * 0.5 * (1 + __import__("math").cos(3.14159 * it / steps)))
    if it % 500 == 0: print(it, round(loss.item(), 4), flush=True)
print("train s", time.time() - t0)
for r in evaluate(model.eval(), task): print(r.row())
from looplm.eval_addition import answer_problems
for n in (5,):
    ans = answer_problems(model, task, task.test_set(n)[:6])
    for a in ans: print(task.format(a.a, a.b), a.text, a.correct)

orig = AdditionTask.get_positions
for shift in (0, 2, 4):
    AdditionTask.get_positions = lambda self, x, split="val", generator=None, s=shift: (lambda p: torch.where(p > 0, p + s, p))(orig(self, x, split, generator))
    print("shift", shift, [r.row()[2] for r in evaluate(model.eval(), task, digits=(3, 4, 5, 6))])
