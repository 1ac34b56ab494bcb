"""Framework backends of dvt. Each turns a dvt_core spec into that framework's tensors.

``dvt_backends.torch`` and ``dvt_backends.mindspore`` implement the same small contract, file for file:
``build_model(spec)``, ``load_state(model, state)``, ``model_state(model)``.
"""
