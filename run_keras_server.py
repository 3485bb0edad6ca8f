"""Start the image classification API: `python run_keras_server.py --help`."""

import sys

from keras_server.cli import main

if __name__ == "__main__":
    sys.exit(main())
