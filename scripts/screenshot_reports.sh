#!/usr/bin/env bash
# Headless Chromium screenshots of brainage-bids HTML reports.
#
# Usage: scripts/screenshot_reports.sh OUTPUT_DIR SHOT_DIR [PARTICIPANT_LABEL ...]
#
# Shoots the participant reports (default: the first sub-*.html in OUTPUT_DIR) and
# OUTPUT_DIR/group/report.html when present: SHOT_DIR/<report>_full.png is the whole page (a tall
# window, blank bottom trimmed) and <report>_partNN.png are WIDTHxHEIGHT tiles of it, for
# reading. Needs Debian's chromium package (apt-get install chromium); tiling needs Python with
# Pillow (the project's .venv has it). Environment: WIDTH (1400), HEIGHT (1100 per tile),
# PAGE_HEIGHT (16000, the tall window), CHROMIUM (chromium), PYTHON.
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '4,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 64
fi
out=$(cd "$1" && pwd)
shots=$2
shift 2
mkdir -p "$shots"
shots=$(cd "$shots" && pwd)
browser=${CHROMIUM:-chromium}
width=${WIDTH:-1400}
height=${HEIGHT:-1100}
page_height=${PAGE_HEIGHT:-16000}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-$here/../.venv/bin/python}
[ -x "$python" ] || python=python3
command -v "$browser" >/dev/null || { echo "error: $browser not found (apt-get install chromium)" >&2; exit 69; }

reports=()
if [ $# -gt 0 ]; then
    for label in "$@"; do reports+=("$out/sub-${label#sub-}.html"); done
else
    first=$(ls "$out"/sub-*.html 2>/dev/null | head -n 1 || true)
    [ -n "$first" ] && reports+=("$first")
fi
[ -f "$out/group/report.html" ] && reports+=("$out/group/report.html")
if [ ${#reports[@]} -eq 0 ]; then
    echo "error: no reports in $out (run brainage-bids with --reports-only first)" >&2
    exit 66
fi

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT

for report in "${reports[@]}"; do
    [ -f "$report" ] || { echo "warning: $report not found" >&2; continue; }
    name=$(basename "$report" .html)
    [ "$name" = report ] && name=group
    full="$shots/${name}_full.png"
    rm -f "$full" "$shots/${name}"_part*.png
    "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --mute-audio \
        --no-first-run --user-data-dir="$profile" --allow-file-access-from-files \
        --virtual-time-budget=5000 --window-size="$width,$page_height" --screenshot="$full" \
        "file://$report" >/dev/null 2>&1 || true
    if [ ! -s "$full" ]; then echo "warning: no screenshot of $report" >&2; continue; fi
    "$python" - "$full" "$height" <<'PY' || echo "warning: not tiled (no Pillow?)" >&2
import sys
from PIL import Image, ImageChops

path, tile = sys.argv[1], int(sys.argv[2])
img = Image.open(path).convert("RGB")
box = ImageChops.difference(img, Image.new("RGB", img.size, (255, 255, 255))).getbbox()
bottom = min(img.height, (box[3] if box else img.height) + 20)
img = img.crop((0, 0, img.width, bottom))
img.save(path)
for i, top in enumerate(range(0, bottom, tile)):
    part = path.replace("_full.png", f"_part{i + 1:02d}.png")
    img.crop((0, top, img.width, min(top + tile, bottom))).save(part)
PY
    ls "$shots/${name}"_*.png
done
