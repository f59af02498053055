"""Review a run in the browser: gallery, image pages with keyboard decisions, classes, failures, "try it".

    python jobs/review.py --run s3://bucket/pseudo/run1 [--audit report/] [--gt instances_val2017.json]

The code and every option: pipeline/usecases/review.py; also `tag2mask review`.
"""

import sys

from pipeline.usecases import review

if __name__ == "__main__":
    sys.exit(review.main())
