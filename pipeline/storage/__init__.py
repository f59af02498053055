"""Storage of a run's outputs under one prefix (a local path or any fsspec URL), by job:

    layout.py    every path of a run (run.json, shards/<id>/..., markers, merged/, labels/<name>.png)
    store.py     fsspec I/O with retries (``Store``, ``RetryPolicy``), the access probe
    outputs.py   a shard's files as bytes; the writers (formats) selected by name
    commit.py    run.json, the commit marker written last, write_shard, is_committed, verify_shard
    merge.py     committed shards -> merged/

Names and fingerprints of images, shards and runs live in ``pipeline.types``.
"""
