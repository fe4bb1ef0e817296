"""Batch pipelines of the Livepeer AI API. Not built yet; see README "Status"."""
