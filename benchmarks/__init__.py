"""Benchmarks and result drivers (`python -m benchmarks.<name>`).

Importing this package runs first: like the stages, it pins the CPU kernels to AVX2 unless params.yaml says
`runtime.reproducible: false`, so a driver's students compute exactly what `dvc repro` would
(`pipeline/kernels.py`).
"""

from pipeline.kernels import pin_cpu_kernels, wanted

pin_cpu_kernels(wanted())
