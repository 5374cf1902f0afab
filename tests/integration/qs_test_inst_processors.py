"""Instrument processors the integration tests run on a server that lists them in ``inst_processors_allowed``
(the server, local Qlib and the clients import this module through ``PYTHONPATH``)."""

from qlib.data.inst_processor import InstProcessor


class Demean(InstProcessor):
    """Each of ``fields`` less its mean over the instrument's frame: over the request's window, so its values
    depend on the window."""

    def __init__(self, fields):
        self.fields = list(fields)

    def __call__(self, df, instrument, *args, **kwargs):
        df[self.fields] = df[self.fields] - df[self.fields].mean()
        return df


class Rescale(InstProcessor):
    """Not listed in the test server's ``inst_processors_allowed``."""

    def __call__(self, df, instrument, *args, **kwargs):
        return df * 2
