"""Serving a teacher over HTTP: `kdcache serve` (issue 28).

Owns: the ASGI app that answers kdcache's wire format (`pipeline.wire`) for any teacher kdcache can load (a zoo,
timm or `py:` checkpoint, a `.pt2` or `.onnx` file), batching concurrent requests into one forward pass (`app`).
Run under uvicorn, the ASGI server the Python web ecosystem uses; users put their own model behind it, and the
endpoint teacher's tests talk to it as a real server process.

May import: `pipeline.models`, `pipeline.data` (a manifest for a file that needs the data set's statistics) and
the core. Nothing of the pipeline imports it but the command line.
"""

from pipeline._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {"TeacherApp": "app", "load_served": "app", "serve": "app"})
