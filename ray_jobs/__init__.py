"""Ray adapters: each ``ray_jobs/<job>.py`` reads a config, runs ``p2n`` code on a Ray cluster and reports.

Run one as ``ray job submit --working-dir . -- python ray_jobs/<job>.py ...`` or through the matching ``p2n``
sub-command. The model and data code stays in ``p2n/``, which never imports Ray.
"""
