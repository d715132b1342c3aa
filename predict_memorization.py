#!/usr/bin/env python3
"""Stage 8 of memcirc: predict which sequences a model memorizes from the data alone.

The same command as `memcirc predict`. `python predict_memorization.py --help` lists its flags and examples; their
text is memcirc/stages/configs/predict_memorization.py.
"""

from memcirc.cli import main

if __name__ == "__main__":
    raise SystemExit(main("predict_memorization"))
