#!/usr/bin/env python3
"""Stage 4 of memcirc: the circuit on held-out pairs, per ablation, against random circuits.

The same command as `memcirc verify`. `python verify_circuit.py --help` lists its flags and examples; their
text is memcirc/stages/configs/verify_circuit.py.
"""

from memcirc.cli import main

if __name__ == "__main__":
    raise SystemExit(main("verify_circuit"))
