#!/usr/bin/env python3
"""Stage 2 of memcirc: contrastive token-id pairs from the memorized windows.

The same command as `memcirc contrastive`. `python contrastive_dataset.py --help` lists its flags and examples; their
text is memcirc/stages/configs/contrastive_dataset.py.
"""

from memcirc.cli import main

if __name__ == "__main__":
    raise SystemExit(main("contrastive_dataset"))
