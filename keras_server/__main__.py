"""`python -m keras_server`: the same command line as `keras-server` and
run_keras_server.py (`python -m keras_server --help`)."""

import sys

from keras_server.cli import main

# argparse would name this file, __main__.py, in usage lines and errors.
PROG = "python -m keras_server"

if __name__ == "__main__":
    sys.exit(main(prog=PROG))
