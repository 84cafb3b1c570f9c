"""llama-ft: DeepSpeed ZeRO-3 LoRA fine-tuning for Llama 3.1 with PEFT adapters."""

import logging as _logging

__version__ = "0.1.0"

# Where bitsandbytes is installed (the tests' NF4 reference; not a dependency of ours), peft imports it, and on a CPU
# with AVX512-bf16 it tries, at import, to fetch a matmul kernel from the Hugging Face Hub through `kernels`,
# warning on stderr when it cannot (offline, untrusted): two lines of noise in front of every one-line error of
# ours. llama-ft never runs bitsandbytes' kernels, so their warnings are silenced; errors still show.
for _name in ("bitsandbytes", "kernels"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
