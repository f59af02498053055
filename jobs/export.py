"""Export a run to FiftyOne, Label Studio or CVAT, honouring review decisions.

    python jobs/export.py s3://bucket/pseudo/run1 --to labelstudio --out ls/ [--rejected skip|tag]

The code and every option: pipeline/usecases/export.py; also `tag2mask export`.
"""

import sys

from pipeline.usecases import export

if __name__ == "__main__":
    sys.exit(export.main())
