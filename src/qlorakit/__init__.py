"""qlorakit: QLoRA fine-tuning from data to a guarded API."""

import os as _os

__version__ = "0.1.0"

# oneDNN, which runs torch's bf16 matmuls on the CPU, compiles and keeps a kernel for every matmul
# shape it meets, in two caches of 1024 entries each by default: about 0.6 MB a shape, 620 MB when
# full (measured). Generation and evaluation meet new shapes with every prompt length (the packaged
# model: 2.4 MB more per new length), so a server or a long evaluation grew by that much. 256
# entries bound it at about 160 MB; a training step uses 40-60 shapes (measured at 4 x 512 and
# 2 x 2048 tokens). Read when torch first runs such a matmul; a value already set is kept.
for _name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    _os.environ.setdefault(_name, "256")
