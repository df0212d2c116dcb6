"""End-to-end pipelines over the library (pretrain, extract, baselines, learners)."""
