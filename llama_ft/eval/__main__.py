"""`python -m llama_ft.eval ...` (one process, or each rank under torchrun / the deepspeed launcher).

It ends through run_and_exit, as the training ranks do: a rank of a gloo process group can otherwise die of
SIGABRT ("terminate called without an active exception") in the interpreter's teardown after its work is done
(llama_ft/train/process_exit.py; seen here in CI on tests/test_eval.py's 2-rank run)."""

from llama_ft.eval.command import main
from llama_ft.train.process_exit import run_and_exit

run_and_exit(main)
