"""`mft compare`: does MFT forget less per unit of specialization than plain finetuning, on your corpora?

protocol.py says what runs (methods, profiles, the plan and its time estimate), runs.py runs it
through the training loop, results.py writes the results file, runs.csv and plots, and stats.py
holds the intervals they report. This package may use mft_pipeline.demo for its default corpora
and model; the pipeline packages never import it.
"""
