"""Copy the model weights to a bucket prefix once, so GPU workers load them from there.

    python jobs/stage_weights.py --dest s3://bucket/tag2mask-weights

The code and every option: pipeline/usecases/weights.py; also `tag2mask stage-weights`.
"""

import sys

from pipeline.usecases import weights

if __name__ == "__main__":
    sys.exit(weights.main())
