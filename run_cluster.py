"""A local cluster: Redis shards, web servers, workers, nginx. See `--help`."""

import sys

from keras_server.cluster import main

if __name__ == "__main__":
    sys.exit(main())
