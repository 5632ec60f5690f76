"""`p2n demo` wiring that the full demo (run by scripts/demo.sh, not by the suite) would only show at its end."""


def test_demo_eval_stage_passes_every_flag_of_p2n_eval(tmp_path, monkeypatch):
    """The demo runs `p2n eval` in-process: its arguments must come from eval's own parser, so a flag added to
    `p2n eval` (here --lpips-weights, --clip) has its default in the demo too (a hand-built Namespace lacked them)."""
    import json

    from p2n.cli import build_parser, demo
    from p2n.cli import eval as eval_cli

    seen = {}

    def fake_run(ns):
        seen.update(vars(ns))
        (tmp_path / "report.json").write_text(json.dumps({"summary": {"paraphrase": {}}}))
        return 0

    monkeypatch.setattr(eval_cli, "run", fake_run)
    summary = {"train": {"ckpt": "/ckpt"}, "dataset": {"uri": "/ds"}}
    demo.stage_eval(tmp_path, None, summary)
    eval_dests = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["eval"]._actions}
    assert eval_dests - {"help"} <= set(seen), eval_dests - set(seen)
    assert (seen["ckpt"], seen["data"], seen["max_objects"], seen["lpips_weights"], seen["clip"]) == (
        "/ckpt", "/ds", 8, None, None)
    assert seen["overrides"] == list(demo.DEMO_OVERRIDES) and summary["eval"] == {"paraphrase": {}}
