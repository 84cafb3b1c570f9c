"""`llama-ft eval` (command.py): loss and greedy exact match of a model, with or without adapters."""
