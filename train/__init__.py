"""``lens train``: custom tags from a folder of the user's own classes.

Mode ``head`` trains a classifier on the frozen backbone's embeddings (computed by the bulk-embedding job and
cached by content hash); mode ``finetune`` trains the network itself with Ray Train. Both write a model package
(:mod:`lens.package`) that every model consumer accepts.
"""
