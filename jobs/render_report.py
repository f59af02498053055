"""Render an audit report in headless Chromium to a PNG and fail on browser-side errors.

    python jobs/render_report.py report/report.html --png report/report.png

Exit 0 when the screenshot was written and Chromium logged no page error ("Uncaught", console
errors, failed loads); 1 otherwise, with the offending log lines; 2 when Chromium is missing.
The report holds no JavaScript, so script errors cannot happen; this catches broken images and
any reference the page would try to load.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
ERROR_LINES = re.compile(r"Uncaught|CONSOLE\(\d+\).*[Ee]rror|ERR_FILE_NOT_FOUND|ERR_NAME_NOT_RESOLVED|Failed to load")


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM if (path := shutil.which(name))), None)


def render(html: Path, png: Path, chromium: str, timeout: float = 120) -> list[str]:
    """Screenshot ``html`` to ``png``; returns the page-error lines of Chromium's log (empty: clean)."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--enable-logging=stderr", "--v=0", f"--screenshot={png}", "--window-size=1280,2000",
               html.resolve().as_uri()]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    log = proc.stdout + proc.stderr
    errors = [line for line in log.splitlines() if ERROR_LINES.search(line)]
    if proc.returncode != 0:
        errors.append(f"chromium exited with {proc.returncode}: {log[-2000:]}")
    if not png.exists():
        errors.append("chromium wrote no screenshot")
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("html", type=Path, help="the report.html to render")
    p.add_argument("--png", type=Path, help="screenshot path (default: next to the HTML)")
    p.add_argument("--chromium", help="browser binary (default: chromium on PATH)")
    args = p.parse_args(argv)
    chromium = args.chromium or find_chromium()
    if chromium is None:
        print("error: no chromium on PATH (Debian: apt-get install -y chromium)", file=sys.stderr)
        return 2
    png = args.png or args.html.with_suffix(".png")
    errors = render(args.html, png, chromium)
    for line in errors:
        print(f"page error: {line}", file=sys.stderr)
    if not errors:
        print(f"rendered {args.html} -> {png}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
