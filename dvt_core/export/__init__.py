"""Export a DVT as one graph per stage (``writer``), the manifest beside the graphs (``manifest``), and the
framework-neutral half of the runtimes that run them (``graph``).

An early-exit cascade cannot be one static graph: graph conditionals branch on one scalar for the whole
batch, and a runtime cannot stop inside a graph. So each stage is its own graph: inputs ``images`` and
what the previous stage left for reuse, outputs the exit's ``logits`` and what the next stage reuses.
A small host loop (:func:`dvt_core.runtime.early_exit.run_adaptive`) passes only the unconfident images on.

Beside the graphs, ``dvt.json`` (the manifest) holds everything a server needs without the training
code: the spec, exit MACs, default thresholds and the budget table from the checkpoint's metadata, class
names, normalisation, library versions and the SHA-256 of every graph. An export is written into a
temporary folder that is renamed into place at the end, so a failed export leaves nothing behind.

Carried tensors (names are the graphs' input / output names):

Graph inputs for them are named ``prev_features`` and ``prev_relations``.

* ``features``: the stage's final tokens (pre-norm), (B, N, C), batch axis 0.
* ``relations``: the pre-softmax attention logits of every block, blocks concatenated over the channel
  axis (block ``j``'s heads are channels ``j*heads .. (j+1)*heads-1``), in the layout the exporting
  backend's next stage reads: (B, depth x heads, N, N) from torch, (depth x heads, B, N, N) from
  MindSpore. The manifest records each tensor's batch axis.
"""
