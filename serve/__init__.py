"""The Ray Serve adapter of p2n: ``serve.app`` (deployments, HTTP API, builder, local runners), ``serve.jobs``
(refinement jobs that outlive replicas), ``serve.store`` (the artefact store) and ``static/`` (the web page).

Like ``ray_jobs/``, this package reads a config, calls ``p2n`` and reports; ``p2n`` itself never imports Ray.
"""
