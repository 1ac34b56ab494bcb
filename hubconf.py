"""torch.hub entry points: one per model of the dvt zoo.

    model = torch.hub.load("/path/to/dvt", "dvt_fashion_mnist", source="local", pretrained=True)

``pretrained=True`` loads the weights this project ships for that model (SHA-256 checked; models without
shipped weights say so); other keyword arguments are spec overrides (``num_classes=10``, ``img_size=...``).
The model is a torch ``nn.Module`` in evaluation mode; ``model(images)`` gives every exit's logits and
``model.adaptive(images, thresholds)`` runs true early exit.
"""
import dvt_core as _dvt_core

dependencies = ["torch", "numpy", "yaml", "safetensors"]


def _entry(name: str):
    def entry(pretrained: bool = False, **overrides):
        return _dvt_core.build(name, backend="torch", weights="default" if pretrained else None, **overrides)

    entry.__name__ = entry.__qualname__ = name
    spec = _dvt_core.get_spec(name)
    entry.__doc__ = (f"{name}: {spec.num_exits} exits on {'/'.join(f'{g}x{g}' for g in spec.grids)} tokens, "
                     f"{spec.img_size}-pixel images, {spec.num_classes} classes.\n\n"
                     "pretrained: load the shipped weights; other keyword arguments override the spec.")
    return entry


for _name in _dvt_core.list_models():
    globals()[_name] = _entry(_name)
del _name
