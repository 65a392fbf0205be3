"""Print a wheel's Requires-Dist for this interpreter, less the torch family and FlashInfer.

Used by setup-static-env.sh: vLLM's wheel pins a torch the disk does not hold, so it is
installed without dependencies and its other requirements are installed from this list.
Extras are dropped and environment markers evaluated, as pip would.
"""

from __future__ import annotations

import sys
import zipfile

try:
    from packaging.requirements import Requirement
except ImportError:  # a fresh venv: pip's own copy
    from pip._vendor.packaging.requirements import Requirement

# torch and the packages built against one torch release; FlashInfer: GPU kernels (JIT).
EXCLUDED = ("torch", "torchvision", "torchaudio", "torchcodec")
EXCLUDED_PREFIXES = ("flashinfer",)


def requirements(wheel: str) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(name).decode()
    out = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = req.name.lower().replace("_", "-")
        if key in EXCLUDED or key.startswith(EXCLUDED_PREFIXES):
            continue
        req.marker = None
        out.append(str(req))
    return out


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1])))
