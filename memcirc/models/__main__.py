"""`python -m memcirc.models convert FOLDER FILE.gguf [--out DIR]`: convert a GGUF once (memcirc.models.gguf).

A package `__main__` rather than `python -m memcirc.models.gguf`: the package imports that module
on its way in, and runpy would then warn that it is already in sys.modules.
"""

import sys

from memcirc.models.gguf import main

sys.exit(main())
