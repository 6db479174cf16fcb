"""The label value that marks "no next token here" (padding past a row's end).

It is a contract between the cache reader, which makes the labels, and the losses, the
evaluation and the Hugging Face integration, which skip it. It lives here, importing nothing,
so that none of them has to import another to learn it: not data/ (the cache format must not
depend on stage one's packages) and not the loss (the cache and evaluation would pull it in).
"""

# PyTorch's cross_entropy default ignore_index, so the same labels feed it directly.
IGNORE_INDEX = -100
