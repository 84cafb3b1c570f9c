"""`python -m llama_ft.eval ...` (one process, or each rank under torchrun / the deepspeed launcher)."""

import sys

from llama_ft.eval.command import main

sys.exit(main())
