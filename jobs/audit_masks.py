"""Audit pseudo labels against ground truth: Parquet tables, a one-screen summary and report.html.

    python jobs/audit_masks.py --pred s3://bucket/pseudo/run1 --gt instances_val2017.json --out report/

The code and every option: pipeline/usecases/audit.py (run_audit); also `tag2mask audit`.
"""

import sys

from pipeline.usecases import audit

if __name__ == "__main__":
    sys.exit(audit.main())
