"""An in-process model of two QEMUs, a host and a running guest, for fast fault campaigns.

:mod:`~livemig.model.world` puts it together (``fake_world``); :mod:`~livemig.model.qemu`,
:mod:`~livemig.model.block`, :mod:`~livemig.model.migration` and :mod:`~livemig.model.host` model
what livemig drives; :mod:`~livemig.model.invariants` checks a world after a migration;
:mod:`~livemig.model.runs` runs one migration under a fault plan; :mod:`~livemig.model.cases` is
the systematic fault table. ``livemig faults`` (:mod:`livemig.fake_campaign`) and the fake-QEMU
tests run it.
"""
