"""mixexport: turn trained mixer-family ranking models into verified, fast, servable bundles.

Importing this package is cheap and never imports TensorRT; heavy libraries load on use.
"""

__version__ = "0.1.0"
