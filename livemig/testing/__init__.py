"""Test machinery for livemig, as ``trio.testing`` is for trio: the model of two QEMUs, the fault
kinds and their injector, the table of fault cases with its oracle, and both fault campaigns."""
