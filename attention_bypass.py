#!/usr/bin/env python3
"""Stage 5 of memcirc: bypass each block's attention; memorization against held-out perplexity.

The same command as `memcirc bypass`. `python attention_bypass.py --help` lists its flags and examples; their
text is memcirc/stages/configs/attention_bypass.py.
"""

from memcirc.cli import main

if __name__ == "__main__":
    raise SystemExit(main("attention_bypass"))
