"""Per-image time of each labeling stage: the ``stages`` section of ``jobs/benchmark.py`` under
its earlier options (kept so existing commands still work).

    python jobs/bench_labeler.py --size tiny --images 8
    python jobs/bench_labeler.py --size full --images 3          # ViT-B/16 + SD 2.1 base shapes
    python jobs/bench_labeler.py --size full --device cuda --dtype bfloat16 --batch-size 8
"""

import sys

from pipeline.bench import labeler

if __name__ == "__main__":
    labeler.main(sys.argv[1:])
