"""Data for training and evaluation: document corpora, QA sets, and generated offline research worlds.

Host-side only (no JAX). Import the module you need:
  `mgrpo_jax.data.corpus`     Document, corpus JSONL in Search-R1's format
  `mgrpo_jax.data.synthetic`  seeded fictional worlds, their corpus and k-hop questions
"""
