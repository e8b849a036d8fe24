"""Run the vlad Gradio app: ``python demo/app.py [--weights random|tiny] [--port 7860]``.

The app itself lives in :mod:`vlad.app` (shipped with the package, also started by ``vlad demo``).
"""

import sys

from vlad.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
