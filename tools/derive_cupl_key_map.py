"""Derive protext's CuPL key map (``protext/descriptions/cupl_key_map.json``) from the real files.

CuPL's own release names some classes differently from the datasets (all 196 Stanford Cars keys put
the year last, 126 of SUN397's keys differ, a few of Caltech101, Flowers102 and UCF101). The ProText
authors re-keyed those files by hand. This script recovers their renaming without reading any name
by eye: an original key and a re-keyed key are the same class when they hold the same description
list (or, where one text was touched up, share most of it). The re-keyed key is then matched to the
dataset's class list (case-insensitively, ``_`` as space). Only class names go into the map, never
descriptions.

    python tools/derive_cupl_key_map.py --shared ../shared --out protext/descriptions/cupl_key_map.json

Rerunning it on the same files gives the same map; ``tests/test_descriptions_cupl.py`` checks that.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# dataset (protext's name) -> (CuPL release file, class list in ../shared/classnames or None, aliases)
DATASETS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "imagenet": ("imagenet_prompts_base.json", "imagenet", ()),
    "caltech101": ("cal_prompts_full.json", "caltech101", ("cal", "caltech", "caltech_101")),
    "dtd": ("texture_prompts_full.json", "dtd", ("texture", "describabletextures", "describable_textures")),
    "eurosat": ("eurosat_prompts_full.json", "eurosat", ()),
    "fgvc_aircraft": ("airplane_prompts_full.json", "aircraft", ("aircraft", "airplane", "fgvcaircraft")),
    "food101": ("food_prompts_full.json", "food101", ("food", "food_101")),
    "oxford_flowers": ("flower_prompts_full.json", "flower102", ("flower", "flowers", "flower102", "flowers102", "oxfordflowers")),
    "oxford_pets": ("pets_prompts_full.json", "pets", ("pets", "oxfordpets")),
    "stanford_cars": ("cars_prompts_full.json", "cars", ("cars", "stanfordcars")),
    "sun397": ("sun_prompts_full.json", "sun397", ("sun", "sun_397")),
    "ucf101": ("ucf_prompts_full.json", "ucf101", ("ucf", "ucf_101")),
    "cifar10": ("cifar10_prompts_full.json", None, ("cifar-10", "cifar_10")),
    "cifar100": ("cifar100_prompts_full.json", None, ("cifar-100", "cifar_100")),
}
MIN_SHARED = 0.8  # an approximate pairing needs this share of the original list in the re-keyed one


def norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def pair_keys(original: dict, rekeyed: dict) -> tuple[dict[str, str], list[str], list[str]]:
    """original key -> re-keyed key, by identical description lists, else by the largest overlap."""
    by_list = {}
    for key, texts in rekeyed.items():
        by_list.setdefault(tuple(texts), []).append(key)
    pairs: dict[str, str] = {}
    approx: list[str] = []
    unpaired: list[str] = []
    for key, texts in original.items():
        same = by_list.get(tuple(texts), [])
        if len(same) == 1:
            pairs[key] = same[0]
            continue
        scores = sorted(((len(set(texts) & set(other)) / max(len(set(texts)), 1), k) for k, other in rekeyed.items()), reverse=True)
        best, runner_up = scores[0], scores[1] if len(scores) > 1 else (0.0, "")
        if best[0] >= MIN_SHARED and runner_up[0] < best[0]:
            pairs[key] = best[1]
            approx.append(f"{key!r} -> {best[1]!r} ({best[0]:.0%} of its descriptions shared)")
        else:
            unpaired.append(key)
    if len(set(pairs.values())) != len(pairs):
        raise SystemExit("two original keys paired with one re-keyed key: refusing to write an ambiguous map")
    return pairs, approx, unpaired


def derive(shared: Path) -> dict:
    out: dict = {
        "about": (
            "CuPL release file names and key renamings per dataset, derived by tools/derive_cupl_key_map.py "
            "from CuPL's original files and the ProText authors' re-keyed copies (matching description lists). "
            "'keys' maps an original CuPL key to the dataset's class name; keys not listed are matched to class "
            "names case-insensitively with '_' as space. 'classes' is the dataset's class list in label order."
        ),
        "datasets": {},
    }
    for dataset, (file, classlist, aliases) in DATASETS.items():
        rekeyed = json.loads((shared / "cupl" / file).read_text(encoding="utf-8"))
        if classlist is None:  # CIFAR: CuPL's keys are the class names, in label order
            classes = list(rekeyed)
        else:
            classes = json.loads((shared / "classnames" / f"{classlist}.json").read_text(encoding="utf-8"))
        entry: dict = {"file": file, "aliases": list(aliases), "classes": classes, "keys": {}, "extra_keys": []}
        class_of = {}
        for name in classes:
            class_of.setdefault(norm(name), name)
        original_path = shared / "cupl" / "original-keys" / file
        if original_path.exists():
            original = json.loads(original_path.read_text(encoding="utf-8"))
            pairs, approx, unpaired = pair_keys(original, rekeyed)
            if unpaired:
                raise SystemExit(f"{original_path}: keys with no re-keyed counterpart: {unpaired}")
            for key, new_key in pairs.items():
                target = class_of.get(norm(new_key))
                if target is None:
                    entry["extra_keys"].append(key)  # a release class the dataset does not have
                elif norm(key) != norm(target):
                    entry["keys"][key] = target
            for line in approx:
                print(f"{dataset}: approximate pairing {line}", file=sys.stderr)
            entry["derived_from"] = f"original-keys/{file} paired with {file}"
        else:
            entry["derived_from"] = "no original-keys file: CuPL's keys are matched by name"
        out["datasets"][dataset] = entry
        print(f"{dataset}: {len(entry['keys'])} renamed keys, {len(entry['extra_keys'])} extra keys", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Derive the CuPL key map from the shared CuPL files.")
    p.add_argument("--shared", type=Path, default=Path("../shared"), help="the shared data folder (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("protext/descriptions/cupl_key_map.json"),
                   help="map file to write (default %(default)s)")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if --out differs from the derived map")
    args = p.parse_args(argv)
    text = json.dumps(derive(args.shared), indent=1, ensure_ascii=False) + "\n"
    if args.check:
        same = args.out.exists() and args.out.read_text(encoding="utf-8") == text
        print("up to date" if same else f"{args.out} differs from the derived map")
        return 0 if same else 1
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
