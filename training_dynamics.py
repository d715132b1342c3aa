#!/usr/bin/env python3
"""Stage 7 of memcirc: memorization and circuits across training checkpoints.

The same command as `memcirc dynamics`. `python training_dynamics.py --help` lists its flags and examples; their
text is memcirc/stages/configs/training_dynamics.py.
"""

from memcirc.cli import main

if __name__ == "__main__":
    raise SystemExit(main("training_dynamics"))
