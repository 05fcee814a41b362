"""The training stage: `python -m launch.train` (main.py) builds a run from the validated config and trains it.

    main.py           the CLI: validate, preflight, --dry-run, spawn local ranks or join the launcher's
    preflight.py      checks that need the world size and the data, before any rank starts
    dry_run.py        what --dry-run prints: shapes, batch sizes, memory per rank
    dist.py           the launcher's environment -> torch.distributed
    engine_config.py  deepspeed_config.json resolved against the config (one source of truth for batch sizes)
    trainer.py        the loop: one step in named pieces (fetch, forward/backward, prefetch, update, after-step)
    optim.py          optimizer and LR schedule
    schedules.py      knot schedules: the objective mix and objective parameters that move during a run
    evaluate.py       held-out evaluation
    metrics.py        TensorBoard, metrics.jsonl, the progress line
    checkpoint.py     checkpoints: layout, `latest`, writing and reading (restricted unpickling, consolidation)
    resume.py         resuming on the same or another world size
    preempt.py        USR1/SIGTERM -> checkpoint -> requeue
    runlock.py        one run per out_dir
    faults.py         fault injection for the tests (CLOZE_FAULT_*), read once at start
    init_from.py      model.init_from: start from a Hugging Face ModernBERT folder
    localrun.py       torchrun for --nproc N
"""
