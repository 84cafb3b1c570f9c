"""Training: the recipe (recipe.py, reads top to bottom) and the token-weighted loss (loss.py).

`python -m llama_ft.train ...` (what run-llama.sh launches on every rank) runs `recipe.main`.
"""
