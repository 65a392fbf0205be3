"""Everything else is in pyproject.toml. This adds `vllm_pool_route.pth` at the root of the
wheel, i.e. of site-packages: the `vllm` command's route (vllm_pool/route.py says why).

The line runs in every Python process of the environment, so it costs a set test on
`sys.orig_argv` and nothing else unless one of the route's words is there; any error in
it is swallowed, so vLLM's CLI runs as if vllm-pool were not installed.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "vllm_pool_route.pth"
# The set test is all that runs where none of the words is on the command line (about
# 20 us to compile at each start, under 1 us to run); requires-python >= 3.10: orig_argv.
PTH_LINE = ('import sys; {"serve-pool", "attach", "detach", "pool"}.isdisjoint(sys.orig_argv) '
            'or exec("try:\\n from vllm_pool.route import at_startup; at_startup()\\n'
            'except Exception: pass")\n')


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        # A wheel is made of build_lib; an editable wheel of what `install` writes (its
        # install_lib is the unpacked wheel), build_lib being left out of it.
        root = (self.get_finalized_command("install").install_lib
                if getattr(self, "editable_mode", False) else self.build_lib)
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, PTH_NAME), "w") as f:
            f.write(PTH_LINE)


setup(cmdclass={"build_py": build_py_with_pth})
