"""`python -m vllm_pool.vllm_main serve-pool|attach|detach|pool ...`: what the `vllm` command
becomes when route.py takes it (`vllm pool ls` -> `vllm-pool ls`, usage lines say `vllm`)."""

import sys

from vllm_pool.cli import main
from vllm_pool.route import pool_argv

if __name__ == "__main__":
    sys.exit(main(pool_argv(sys.argv[1:]), prog="vllm"))
