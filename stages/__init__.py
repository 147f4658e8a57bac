"""DVC stage entry points: `python -m stages.<name>` (one module per stage of dvc.yaml).

Importing this package runs first, before a stage module loads torch or numpy: it pins the CPU kernels to
AVX2 when the params file's `runtime.reproducible` is true (the default), so every stage's numbers are
byte-identical on any x86-64 machine (`pipeline/kernels.py`).
"""

from pipeline.kernels import pin_cpu_kernels, wanted

pin_cpu_kernels(wanted())
