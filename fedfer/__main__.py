import sys

from fedfer.cli import main

sys.exit(main())
