"""Consensus labels of several runs (the class where every run agrees, 255 elsewhere), written
under --out like a run; rerun the same command to finish or resume.

    python jobs/consensus.py s3://bucket/pseudo/cliper s3://bucket/pseudo/clip-es --out s3://bucket/pseudo/agreed

The code: pipeline/usecases/consensus.py (consensus_of); also `tag2mask consensus`.
"""

import sys

from pipeline.usecases import consensus

if __name__ == "__main__":
    sys.exit(consensus.main())
