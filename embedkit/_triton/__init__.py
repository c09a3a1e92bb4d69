"""Pure Triton kernels and their host launchers. Imports torch and triton only, never the rest of
embedkit (embedkit.ops calls these launchers, never the other way; tests/test_packaging.py checks it).
It lives inside the package (it was the top-level `tritonkernels`) so that installing embedkit puts
no generic top-level name on sys.path. `_common` holds what the kernel files share (GPU-only
autotuning, the tl.dot operand convention, constants).

`INTERPRET` records whether TRITON_INTERPRET=1 was set when this package was imported: Triton
decides at decoration time whether a kernel is compiled or interpreted, so setting the variable
later does not turn these kernels into interpreted ones.
"""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
