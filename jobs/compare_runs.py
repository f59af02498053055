"""Compare two runs image by image: Parquet tables, summary.json and report.html under --out.

    python jobs/compare_runs.py s3://bucket/pseudo/cliper s3://bucket/pseudo/clip-es --out compare/

The code and every option: pipeline/usecases/compare.py (compare_runs); also `tag2mask compare`.
"""

import sys

from pipeline.usecases import compare

if __name__ == "__main__":
    sys.exit(compare.main())
