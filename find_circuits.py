#!/usr/bin/env python3
"""Stage 3 of memcirc: the circuit behind a memorization decision (EAP-IG on auto-circuit's graph).

The same command as `memcirc circuits`. `python find_circuits.py --help` lists its flags and examples; their
text is memcirc/stages/configs/find_circuits.py.
"""

from memcirc.cli import main

if __name__ == "__main__":
    raise SystemExit(main("find_circuits"))
