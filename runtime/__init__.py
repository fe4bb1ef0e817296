"""Model runtime shared by live and batch pipelines: devices and dtypes (device.py), where models
live and how they load (models.py), one inference worker per device (worker.py), and tiny
random-weight models of the real architectures for tests and smoke tests (tiny.py).

torch is imported lazily inside functions, so importing this package stays cheap.
"""
