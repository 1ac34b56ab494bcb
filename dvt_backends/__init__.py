"""Framework backends of dvt, installed as ``dvt_backends``. Each turns a dvt_core spec into that framework's tensors.

``dvt_backends.torch`` and ``dvt_backends.mindspore`` mirror each other file for file and each defines
every member of the one backend contract, ``dvt_core.runtime.contract.Backend``, with the same signature.
"""
