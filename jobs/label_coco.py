"""Label a dataset on a Ray cluster (or a local Ray): COCO annotations, PNG label maps and Parquet
statistics under --output; rerun the same command to finish an interrupted run.

    ray job submit --working-dir . -- python jobs/label_coco.py \\
        --annotations s3://bucket/coco/instances_train2017.json \\
        --images s3://bucket/coco/train2017/ --output s3://bucket/pseudo/run1

The code: pipeline/usecases/label.py (label_dataset, plan); also `tag2mask label`.
"""

import sys

from pipeline.usecases import label

if __name__ == "__main__":
    sys.exit(label.main())
