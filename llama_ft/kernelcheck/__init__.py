"""Ahead-of-time compile check of every Triton kernel of the project, for every GPU generation we support.

Triton compiles for any NVIDIA target without a GPU or a driver: `triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32), options=...)` gives PTX and a cubin, and ptxas (shipped in the wheel)
reports registers and spill bytes. `llama-ft kernels --compile sm_80,...` does that for each launch the
dispatchers can make (registry.py), with the arguments specialized exactly as a launch specializes them
(compile.py), and prints one row per kernel, configuration and architecture (command.py).
"""
