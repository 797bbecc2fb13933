"""The counter lives in the package (`tp-plugin verify` counts collectives too); tests import it from here."""

from tp_plugin.testing.collectives import COLLECTIVES, CollectiveCounter  # noqa: F401
