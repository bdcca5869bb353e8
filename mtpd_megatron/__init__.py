"""Self-distilled multi-token prediction (MTP-D) on megatron-core.

Importing the package stubs one CUDA-only megatron-core module where triton is absent (CPU machines):
megatron-core 0.19.2 imports triton at import time (see parallel/cpu_compat.py, `import_shims`).
"""

from mtpd_megatron.parallel.cpu_compat import import_shims as _import_shims

_import_shims()
