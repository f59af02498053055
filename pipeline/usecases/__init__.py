"""The use cases, one module each: a library function a program calls, and the command that the
job in ``jobs/`` and ``tag2mask`` put in front of it (its parser, its printing, its exit status).

    label      label_dataset(...), plan(...)          jobs/label_coco.py     tag2mask label / plan
    audit      run_audit(...)                         jobs/audit_masks.py    tag2mask audit
    explain    explain_image(...)                     jobs/explain.py        tag2mask explain
    compare    compare_runs(...)                      jobs/compare_runs.py   tag2mask compare
    consensus  consensus_of(...)                      jobs/consensus.py      tag2mask consensus
    weights    (pipeline.models.stage_weights)        jobs/stage_weights.py  tag2mask stage-weights
    demo       run_demo(...)                          jobs/demo.py           tag2mask demo

Nothing is imported here, so that ``pipeline.usecases.audit`` loads no model code.
"""
