"""Framework backends of dvt, installed as ``dvt_backends``. Each turns a dvt_core spec into that framework's tensors.

``dvt_backends.torch`` and ``dvt_backends.mindspore`` mirror each other file for file and each fills the
framework layer of the runtime contract, ``dvt_core.runtime.contract.Framework``, with the same signatures;
``dvt_backends.onnx``, ``openvino`` and ``mindir`` fill its ``GraphRuntime`` layer. dvt_core reaches each
through its registry (``dvt_core.runtimes``), and no backend imports another.
"""
