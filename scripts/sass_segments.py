"""Where a kernel's math sits between its waits: the SASS of each kernel cut at every wait or barrier.

    python scripts/sass_segments.py OBJECT_OR_SASS [--kernel SUBSTRING] [--ops MUFU,FADD,...]

OBJECT_OR_SASS: an object file or extension (.o, .so, .cubin; disassembled with `cuobjdump --dump-sass`,
found on PATH or in Triton's package) or a saved `cuobjdump --dump-sass` listing. For each kernel whose
mangled name contains SUBSTRING it prints one line per segment: the instruction that opens it (a wgmma
wait `WARPGROUP.DEPBAR`, a block barrier `BAR.SYNC`, an mbarrier wait `SYNCS.PHASECHK`), its address, and
how many of the chosen instructions follow before the next one. Example (docs/perf.md, v9): in the Hopper
forward the exponentials (MUFU) belong between `WARPGROUP.DEPBAR.LE gsb0, 0x1` and `... 0x0`, under the
P V MMA.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

OPENERS = ("WARPGROUP.DEPBAR", "BAR.SYNC", "SYNCS.PHASECHK")
DEFAULT_OPS = "HGMMA,MUFU,FADD,FMUL,FFMA,FMNMX,FSEL,F2FP,SHFL"
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise SystemExit("cuobjdump not found: put it on PATH or install triton (it carries one)")


def sass_text(path: Path) -> str:
    if path.suffix in {".o", ".so", ".cubin"}:
        return subprocess.run(
            [cuobjdump(), "--dump-sass", str(path)], capture_output=True, text=True, check=True
        ).stdout
    return path.read_text()


def segments(body: str, ops: set[str]) -> list[tuple[str, int, collections.Counter]]:
    """(opening instruction, its address, counts of the chosen instructions up to the next opener)."""
    out: list[tuple[str, int, collections.Counter]] = [("(entry)", 0, collections.Counter())]
    for match in INSTRUCTION.finditer(body):
        address, op = int(match.group(1), 16), match.group(2)
        if op.startswith(OPENERS):
            out.append((f"{op}{match.group(3)}".strip(), address, collections.Counter()))
        elif op.split(".")[0] in ops:
            out[-1][2][op.split(".")[0]] += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", type=Path)
    parser.add_argument("--kernel", default="", help="substring of the mangled kernel names to show")
    parser.add_argument("--ops", default=DEFAULT_OPS, help="instructions to count (comma-separated)")
    args = parser.parse_args()
    ops = set(args.ops.split(","))
    for chunk in re.split(r"\n\s*Function : ", sass_text(args.path))[1:]:
        name, _, body = chunk.partition("\n")
        if args.kernel not in name:
            continue
        print(name.strip())
        for op, address, counts in segments(body, ops):
            shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            print(f"  {address:#07x} {op[:56]:<56} {shown}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
