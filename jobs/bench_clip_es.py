"""Milliseconds per image of CLIP-ES (pipeline/clip_es.py) at tiny and ViT-B/16 shapes, random
weights, on this machine; text features are embedded once per run and timed apart.

    python jobs/bench_clip_es.py                                  # tiny and ViT-B-16, 500x375, 2 tags
    python jobs/bench_clip_es.py --shapes ViT-B-16 --size 640x480 --tags 1 3 --images 3

The code: pipeline/bench/clip_es.py.
"""

import sys

from pipeline.bench import clip_es

if __name__ == "__main__":
    sys.exit(clip_es.main())
