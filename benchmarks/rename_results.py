"""Carry a quality results file over to another name: rename the set tag in its keys, merge into the target file.

For when a candidate model measured under ``--model DIR --tag=-T`` ships bit for bit as the built-in model: its sets
are the built-in model's sets (check a set's PNG hashes first), and its nets are seeded and deterministic at one
thread, so its figures are the built-in model's figures under the untagged names. Keys already in the target are
kept (a net measured again is not overwritten by a carried one); the carried keys are listed.

    python benchmarks/rename_results.py SRC.json DST.json --tag-from=-cool35k [--tag-to=]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from raydistill.outputs import save_merged_json


def rename(src: dict, tag_from: str, tag_to: str) -> dict:
    """``src`` with ``tag_from`` replaced by ``tag_to`` in the set name (the key's first field) of every entry."""
    out: dict = {}
    for section, entries in src.items():
        if not isinstance(entries, dict):
            out[section] = entries
            continue
        out[section] = {}
        for key, value in entries.items():
            name, sep, rest = key.partition("|")
            if not name.endswith(tag_from):
                raise SystemExit(f"{key!r} does not carry the tag {tag_from!r}; "
                                 "pass --tag-from the tag the source was measured under")
            out[section][name[: len(name) - len(tag_from)] + tag_to + sep + rest] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--tag-from", required=True)
    ap.add_argument("--tag-to", default="")
    a = ap.parse_args()
    carried = rename(json.loads(Path(a.src).read_text()), a.tag_from, a.tag_to)
    dst = Path(a.dst)
    have = json.loads(dst.read_text()) if dst.exists() else {}
    new = {section: {k: v for k, v in entries.items() if k not in have.get(section, {})}
           if isinstance(entries, dict) else entries
           for section, entries in carried.items() if isinstance(entries, dict) or section not in have}
    for entries in new.values():
        for key in entries if isinstance(entries, dict) else ():
            print(f"carried {key}")
    save_merged_json(dst, new, indent=1)  # under the lock quality.py writes with, so no side-by-side run is lost


if __name__ == "__main__":
    main()
