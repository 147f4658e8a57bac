"""Data: everything `prepare` and `corrupt` make, and the one way to read it back.

Owns: source readers (IDX, CIFAR pickles, ImageFolder, synthetic), WebDataset shards + manifest
(`shards`: writer, the one shard reader `iter_shard` / `read_rows`, `ShardError`), the fast tar/PNG
codec (`tario`), consistent augmentation views (`views`), corrupted test copies (`corruptions`), and
the `prepare` stage's library side.

May import: `pipeline.config`, `pipeline.runtime`, `pipeline.layout`. Nothing of cache, losses,
models, training or evaluation.

Add a source: a module in `sources/` with a reader registered in `SOURCES` (options checked by its signature).
"""

from pipeline._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "Manifest": "shards",
        "ShardError": "shards",
        "iter_shard": "shards",
        "load_manifest": "shards",
        "read_rows": "shards",
        "write_dataset": "shards",
        "ViewRecipe": "views",
        "SOURCES": "sources",
        "load_split": "sources",
        "open_imagefolder": "sources",
        "prepare": "prepare",
        "CorruptConfig": "corruptions",
        "load_corrupted": "corruptions",
        "write_corrupted": "corruptions",
    },
)
