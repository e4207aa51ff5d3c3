"""tokenbench's experiment pipeline, on top of the model harness (``bench``: vit, attention, macs,
throughput): experiment files (``config``, ``schema``, ``profiles``) -> runs executed in-process, in local
subprocesses or on SLURM (``executors``, ``slurm``, ``distributed``) -> one run = the stages of
``stages/`` on a model built by ``models`` from ``data`` (``runner``, ``context``, ``train``, ``dense``,
``predict``) -> one JSON record per run (``records``, ``status``); ``files`` writes every file.

Importing this package is light: ``report.py`` reads records without the model stack.
"""
