#!/usr/bin/env python3
"""Entry point: `python3 server_tgi.py --model <hub id or local dir> [--endpoint http://host:8080]`."""

import sys

from tgi_gateway.cli import main

if __name__ == "__main__":
    sys.exit(main())
