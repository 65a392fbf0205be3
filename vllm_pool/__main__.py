import sys

from vllm_pool.cli import main

sys.exit(main())
