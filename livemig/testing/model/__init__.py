"""An in-process model of two QEMUs, a host and a running guest, for fast fault campaigns.

:mod:`~livemig.testing.model.world` puts it together (``fake_world``);
:mod:`~livemig.testing.model.qemu`, :mod:`~livemig.testing.model.block`,
:mod:`~livemig.testing.model.migration` and :mod:`~livemig.testing.model.host` model what livemig
drives; :mod:`~livemig.testing.model.invariants` checks a world after a migration;
:mod:`~livemig.testing.model.runs` runs one migration under a fault plan. The fault table is
:mod:`livemig.testing.cases`; ``livemig faults`` (:mod:`livemig.testing.campaign_fake`) and the
fake-QEMU tests run it.
"""
