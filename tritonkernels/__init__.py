"""Pure Triton kernels and their host launchers. Imports torch and triton only (never embedkit).

`INTERPRET` records whether TRITON_INTERPRET=1 was set when this package was imported: Triton
decides at decoration time whether a kernel is compiled or interpreted, so setting the variable
later does not turn these kernels into interpreted ones.
"""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
