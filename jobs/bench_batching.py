"""Does the batch size change the labels? Every preset at batch 1, 2 and 8 (pipeline/bench/batching.py).

    python jobs/bench_batching.py [--presets voc-vit-b16,clip-es-voc] [--batch-sizes 1,2,8]
"""

import sys

from pipeline.bench import batching

if __name__ == "__main__":
    batching.main(sys.argv[1:])
