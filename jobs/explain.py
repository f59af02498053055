"""Show what the labeler sees for one image and its tags: heatmaps, the label map over the image,
and with --dump the raw arrays.

    python jobs/explain.py --image cat.jpg --tags cat,dog --out explain/ [--dump explain/maps.npz]
    python jobs/explain.py --image cat.jpg --tags cat --out explain/ --discovery   # + regions.png

The code and every option: pipeline/usecases/explain.py (explain_image); also `tag2mask explain`.
"""

import sys

from pipeline.usecases import explain

if __name__ == "__main__":
    sys.exit(explain.main())
