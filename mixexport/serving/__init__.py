"""Serving a bundle from other servers: :mod:`mixexport.serving.triton` writes Triton Inference Server
model repositories (``mixexport triton``); :mod:`mixexport.serving.triton_server` starts a local
``tritonserver`` (the one in the ``nvidia-pytriton`` wheel) for tests and load runs."""
