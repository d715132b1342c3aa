#!/usr/bin/env python3
"""Stage 1 of memcirc: score every window of a corpus for verbatim memorization.

The same command as `memcirc score`. `python memorization_score.py --help` lists its flags and examples; their
text is memcirc/stages/configs/memorization_score.py.
"""

from memcirc.cli import main

if __name__ == "__main__":
    raise SystemExit(main("memorization_score"))
