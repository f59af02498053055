"""Pseudo-labels from image-level tags: CLIPer (or another registered method) + Felzenszwalb, at dataset scale.

The stages, in the order an image meets them (one module each):

    types.py         the records every stage shares (Category, LabelRequest/LabelResult, Failure,
                     statuses, IGNORE), image and shard names, run fingerprints; no torch
    config.py        frozen settings, named presets (cliper-method.md section 5)
    schemas.py       JSON Schemas (schemas/) and Arrow schemas: manifest, config, stats, marker
    decode.py        bytes -> upright HWC uint8 RGB, bad images -> ImageDecodeError
    models.py        load CLIP (open_clip) and SD (diffusers); model fingerprint
    weights.py       staged weights in a bucket: sha256 manifest, per-node content-keyed cache
    methods/         the method registry: a method turns images + candidate classes into score maps
                     (cliper: cliper.py + compensation.py; clip-es: clip_es.py + clip_es_prompts.py)
    cliper.py        CLIPer coarse map: early-layer fusion inside the ViT
    compensation.py  SD self-attention capture and the right-to-left fusion chain
    clip_es.py       CLIP-ES: softmax-GradCAM and class-aware attention affinity
    refine.py        Felzenszwalb superpixels and score pooling
    felzenszwalb.py  the superpixel segmentation: scikit-image's segments, compiled with numba
                     (a radix-sorted, order-checked path; np.argsort where equal costs compete)
    malloc.py        glibc keeps freed pages: labeling actors stop re-faulting per-image buffers
    discovery.py     potential objects in the untagged area: K-means on CLIP tokens, tag suggestions
    labels.py        scores -> label map (background threshold, argmax, ignore)
    labeler.py       holds the configured method, runs it on a batch, assembles each label map
    coco.py, pngs.py, stats.py   label map -> COCO RLE, indexed PNG, Parquet quality rows
    storage/         a run's outputs by job: layout.py (every path: the only module that knows
                     them), store.py (fsspec I/O, retries, access probe), outputs.py (the formats
                     a shard writes, by name), commit.py (run.json, commit marker), merge.py
    manifest.py      JSONL / COCO manifests streamed into content-named shards
    shards.py        one shard end to end with a labeler in hand (I/O threads overlap the models)
    runner.py        the only module that talks to Ray: actors, deadlines, retries, resume, progress
    lease.py         one driver per output prefix: a lease object with owner and expiry

and, beside it, audit and comparison: pseudo labels vs ground truth, runs vs runs

    audit.py         readers (our outputs, COCO/PNG ground truth), confusion matrix, metrics
    report.py        the static HTML report with embedded charts
    compare.py       two runs image by image: agreement, IoU of A against B, audits side by side
    compare_report.py   the comparison's HTML report, in the audit report's style
    consensus.py     label maps where several runs agree (255 elsewhere), written as a run

and, after a run, the people who curate it

    review/          the review web app: gallery, image pages, decisions, classes, "try it"
    export.py        FiftyOne, Label Studio and CVAT exports that honour review decisions

Beside them: prompts.py (prompt data), cli.py (the ``tag2mask`` command and the options every job
shares), usecases/ (one module per command: label_dataset, plan, run_audit, ...; jobs/ are thin
entries in front of them), bench/ (the benchmarks, and the model shapes tests and benchmarks
build), demo.py (the demo dataset: scikit-image photographs with a COCO instances file, and tiny
random-weight models). docs/ARCHITECTURE.md draws the layers and says where to add things.
"""
