"""`python -m llama_ft.train`: the entry point the DeepSpeed launcher starts on every rank."""

import sys

from llama_ft.train.recipe import main

sys.exit(main())
