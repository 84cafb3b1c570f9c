"""`python -m llama_ft.train`: the entry point the DeepSpeed launcher starts on every rank."""

from llama_ft.train.process_exit import run_and_exit
from llama_ft.train.recipe import main

run_and_exit(main)
