"""The livemig benchmark: livemig against libvirt, an LXD-equivalent sequence and the floor.

Not part of the test suite. Run ``python -m bench --help``; see ``bench/README.md``.
"""
