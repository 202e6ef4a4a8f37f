"""Regenerate screenshots/*.svg: every console screen at 80x24 and 120x40.

Run from the repository root:  .venv/bin/python scripts/screenshots.py
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.tui.scenes import SCENES, SIZES  # noqa: E402


async def shoot(out: Path) -> list[Path]:
    written: list[Path] = []
    for scene in SCENES:
        for width, height in SIZES:
            app = scene.app()
            async with app.run_test(size=(width, height)) as pilot:
                await scene.run(pilot)
                path = out / f"{scene.name}-{width}x{height}.svg"
                path.write_text(app.export_screenshot(title=f"neonpoly · {scene.what}"))
                written.append(path)
    return written


def main() -> None:
    out = ROOT / "screenshots"
    out.mkdir(exist_ok=True)
    for path in asyncio.run(shoot(out)):
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
