"""Regenerates the shipped tokenizer and processor config in jaxvg/assets/tokenizer/, deterministically.

  python tools/build_tokenizer.py            # rewrite the assets
  python tools/build_tokenizer.py --check    # exit 1 when the committed assets differ from a fresh build
  python tools/build_tokenizer.py --out DIR  # write somewhere else
"""

import argparse
import filecmp
import os
import sys
import tempfile

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from jaxvg.data import tokenizer  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=str(tokenizer.ASSET_DIR), help="output directory")
  parser.add_argument("--check", action="store_true", help="compare a fresh build with --out instead of writing")
  args = parser.parse_args(argv)
  if not args.check:
    names = tokenizer.build_assets(args.out)
    sizes = {name: os.path.getsize(os.path.join(args.out, name)) for name in names}
    print(f"wrote {args.out}: {sizes}")
    return 0
  with tempfile.TemporaryDirectory() as tmp:
    names = tokenizer.build_assets(tmp)
    stale = [n for n in names if not os.path.isfile(os.path.join(args.out, n))
             or not filecmp.cmp(os.path.join(tmp, n), os.path.join(args.out, n), shallow=False)]
  if stale:
    print(f"stale tokenizer assets in {args.out}: {stale}; run python tools/build_tokenizer.py")
    return 1
  print(f"{args.out} is up to date")
  return 0


if __name__ == "__main__":
  sys.exit(main())
