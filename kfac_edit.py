#!/usr/bin/env python3
"""Stage 6 of memcirc: edit memorization out of a model with K-FAC.

The same command as `memcirc kfac`. `python kfac_edit.py --help` lists its flags and examples; their
text is memcirc/stages/configs/kfac_edit.py.
"""

from memcirc.cli import main

if __name__ == "__main__":
    raise SystemExit(main("kfac_edit"))
