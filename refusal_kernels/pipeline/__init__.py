"""End-to-end abliteration pipeline: prompt sets, direction finding and model editing."""
